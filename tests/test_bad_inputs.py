"""Bad inputs and faults end in ONE line that names the culprit, exit status 2, and leave every output
as it was (issue 13). Stage ``main()`` functions run in-process on a tiny run directory; workflow-level
cases use ``snakemake -n``.

Each in-process case snapshots the whole tree before and after: nothing may change, and no temporary
file may be left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, checkout_env, snakemake

torch.set_num_threads(1)

ARCH = {"embed_dim": 16, "n_blocks": 1, "n_heads": 2, "dim_ff": 32, "content_dim": 4, "head_hidden": 8,
        "dropout": 0.0, "rope_base": 10000.0, "self_condition": True, "logit_mode": "matched_filter_residual",
        "mf_clip": 30.0}
BITS, SEQ_LEN = 7, 6
WORDS = "in the beginning god created the heavens and the earth now the earth was formless and empty".split()


def _final(path: Path, *, bits=BITS, seq_len=SEQ_LEN, data=None, poison=False, seed=0):
    from bitstream import checkpoint

    torch.manual_seed(seed)
    model = checkpoint.build_model(ARCH, bits, seq_len)
    state = model.state_dict()
    if poison:
        name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
        state[name] = state[name].clone()
        state[name][0] = float("nan")
    meta = {"architecture": ARCH, "training": {"sigma_data": 0.5}, "bits": bits, "seq_len": seq_len, "step": 0}
    if data is not None:
        meta["data"] = data
    checkpoint.save(path, {"format": checkpoint.MODEL_FORMAT, "model": state, "meta": meta})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """results/toy: corpus, tokenizer (bits 7), cache meta, final.pt + entropy tables; plus bad files."""
    from bitstream.decode import run_data_identity
    from bitstream.schedule import EntropySchedule
    from bitstream.tokenizer import build_tokenizer

    base = tmp_path_factory.mktemp("bad_inputs")
    root = base / "results" / "toy"
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    for split in ("train", "validation", "test"):
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    tok = build_tokenizer(corpus, {"style": "lm1b", "tokenizer": {"kind": "wordpiece", "vocab_size": 90}},
                          root / "tokenizer" / "base")
    (root / "cache").mkdir()
    (root / "cache" / "test.meta.json").write_text(json.dumps(
        {"bits": BITS, "seq_len": SEQ_LEN, "vocab_size": tok["vocab_size"], "n_rows": 0}))
    identity = run_data_identity(root)
    models = root / "models"
    _final(models / "good" / "checkpoints" / "final.pt", data=identity)
    edges = torch.logspace(math.log10(0.002), math.log10(80.0), 17)
    pdf = torch.full((16,), 1 / 16)
    EntropySchedule(pdf=pdf, cdf=pdf.cumsum(0), sigmas=(edges[1:] * edges[:-1]).sqrt(),
                    edges=edges).save(models / "good" / "entropy")
    bad = base / "bad"
    _final(bad / "bits8.pt", bits=8, data={**identity, "bits": 8})
    _final(bad / "seq8.pt", seq_len=8, data={**identity, "seq_len": 8})
    _final(bad / "other_tokenizer.pt", data={**identity, "tokenizer_sha256": "0123456789abcdef"})
    _final(bad / "other_vocab.pt", data={**identity, "vocab_size": identity["vocab_size"] + 5})
    _final(bad / "nan.pt", data=identity, poison=True)
    (bad / "garbage.pt").write_bytes(b"this is not a checkpoint at all")
    (bad / "zipjunk.pt").write_bytes(b"PK\x03\x04" + os.urandom(64))
    (bad / "a_directory.pt").mkdir()
    (bad / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (bad / "out_is_dir.parquet").mkdir()
    return {"base": base, "root": root, "bad": bad, "identity": identity, "vocab": tok["vocab_size"]}


def _snapshot(base: Path) -> dict:
    """Every file (hidden temporaries included) -> its SHA-256; directories only when non-empty."""
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file()}


def _sample_argv(world, **over):
    root = world["root"]
    args = {"--checkpoint": str(root / "models" / "good" / "checkpoints" / "final.pt"),
            "--entropy-dir": str(root / "models" / "good" / "entropy"), "--run-dir": str(root),
            "--spec": json.dumps({"sampler": "ddim_entropic", "nfe": 4, "num_samples": 2, "micro_batch": 2}),
            "--seed": "0", "--out": str(world["base"] / "out" / "s.parquet"), "--device": "cpu"}
    for k, v in over.items():
        args["--" + k.replace("_", "-")] = v(world) if callable(v) else v
    return [x for kv in args.items() for x in kv]


def _spec(**kw):
    return json.dumps({"sampler": "ddim_entropic", "nfe": 4, "num_samples": 2, "micro_batch": 2, **kw})


# (case id, stage module, argv builder, needles the one-line message must contain)
SAMPLE_CASES = [
    ("ckpt_bits", dict(checkpoint=lambda w: str(w["bad"] / "bits8.pt")), ["bits8.pt", "bits: checkpoint 8, run 7"]),
    ("ckpt_seq_len", dict(checkpoint=lambda w: str(w["bad"] / "seq8.pt")), ["seq8.pt", "seq_len: checkpoint 8"]),
    ("ckpt_other_tokenizer", dict(checkpoint=lambda w: str(w["bad"] / "other_tokenizer.pt")),
     ["other_tokenizer.pt", "tokenizer fingerprint"]),
    ("ckpt_other_vocab", dict(checkpoint=lambda w: str(w["bad"] / "other_vocab.pt")), ["other_vocab.pt", "vocab_size"]),
    ("ckpt_nan_weights", dict(checkpoint=lambda w: str(w["bad"] / "nan.pt")), ["nan.pt", "NaN/Inf"]),
    ("ckpt_garbage", dict(checkpoint=lambda w: str(w["bad"] / "garbage.pt")), ["garbage.pt", "not a readable checkpoint"]),
    ("ckpt_zip_junk", dict(checkpoint=lambda w: str(w["bad"] / "zipjunk.pt")), ["zipjunk.pt", "not a readable checkpoint"]),
    ("ckpt_is_dir", dict(checkpoint=lambda w: str(w["bad"] / "a_directory.pt")), ["a_directory.pt"]),
    ("ckpt_missing", dict(checkpoint=lambda w: str(w["bad"] / "nope.pt")), ["nope.pt", "not found"]),
    ("out_is_dir", dict(out=lambda w: str(w["bad"] / "out_is_dir.parquet")), ["out_is_dir.parquet", "is a directory"]),
    ("num_samples_0", dict(spec=_spec(num_samples=0)), ["num_samples", "got 0"]),
    ("micro_batch_0", dict(spec=_spec(micro_batch=0)), ["micro_batch", "got 0"]),
    ("spec_unknown_key", dict(spec=_spec(gama=0.1)), ["gama"]),
    ("spec_bad_json", dict(spec="{sampler: ddim"), ["--spec", "JSON"]),
    ("spec_nfe_unreachable", dict(spec=_spec(sampler="heun_karras", nfe=4, window="full")), ["nfe 4", "heun"]),
    ("spec_gamma_too_big", dict(spec=_spec(gamma=0.9)), ["gamma"]),
    ("spec_negative_s_noise", dict(spec=_spec(s_noise=-1.0)), ["s_noise"]),
    ("seed_negative", dict(seed="-1"), ["--seed", "-1"]),
    ("entropy_dir_missing", dict(entropy_dir=lambda w: str(w["bad"] / "no_tables")), ["no_tables", "entropy tables"]),
    ("run_dir_without_tokenizer", dict(run_dir=lambda w: str(w["bad"])), ["tokenizer"]),
]


def _expect_one_line_exit(capsys, fn, needles):
    from bitstream.io import StageExit

    with pytest.raises(SystemExit) as info:
        fn()
    assert isinstance(info.value, StageExit) and info.value.code == 2, info.value
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message on stderr"
    line = err[-1]
    assert str(info.value) == line
    for needle in needles:
        assert needle in line, (needle, line)
    assert "Traceback" not in line and "weights_only=False" not in line
    return line


@pytest.mark.parametrize("case, over, needles", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_sample_bad_input(world, capsys, case, over, needles):
    from bitstream.sample import main

    before = _snapshot(world["base"])
    _expect_one_line_exit(capsys, lambda: main(_sample_argv(world, **over)), needles)
    assert _snapshot(world["base"]) == before  # nothing written, changed or left half-written


def test_the_good_checkpoint_samples(world, tmp_path):
    """The fixture is sound: the bad cases fail for their own reason, not the run directory's."""
    from bitstream.sample import main

    main(_sample_argv(world, out=str(tmp_path / "ok.parquet")))
    assert (tmp_path / "ok.parquet").is_file()
    assert oct((tmp_path / "ok.parquet").stat().st_mode & 0o777) == oct(0o644)


def _data_cases():
    def corpus(source, out="corpus_out"):
        def run(w):
            from bitstream.corpus import main

            main(["--params", json.dumps({"style": "lm1b", "corpus": {"source": source}}),
                  "--out-dir", str(w["base"] / out)])
        return run

    def tokenizer(params, out="tok_out"):
        def run(w):
            from bitstream.tokenizer import main

            main(["--corpus-dir", str(w["root"] / "corpus"), "--params", json.dumps(params),
                  "--out-dir", str(w["base"] / out)])
        return run

    def cache(tokenizer_dir, params=None):
        def run(w):
            from bitstream.token_cache import main

            main(["--corpus-dir", str(w["root"] / "corpus"), "--tokenizer-dir", str(tokenizer_dir(w)), "--split", "test",
                  "--params", json.dumps(params or {"style": "lm1b", "seq_len": 4, "bits": BITS}),
                  "--out", str(w["base"] / "cache_out" / "test")])
        return run

    return [
        ("corpus_not_utf8", lambda w: corpus(f"text:{w['bad'] / 'latin1.txt'}")(w), ["latin1.txt", "not UTF-8"]),
        ("corpus_file_missing", lambda w: corpus(f"text:{w['bad'] / 'missing.txt'}")(w), ["missing.txt", "not found"]),
        ("corpus_bad_source", lambda w: corpus("ftp:somewhere")(w), ["corpus.source", "ftp:somewhere"]),
        ("tokenizer_bits_too_small", lambda w: tokenizer({"style": "lm1b", "bits": 3,
                                                          "tokenizer": {"kind": "wordpiece", "vocab_size": 90}})(w),
         ["bits = 3", "does not fit"]),
        ("tokenizer_bad_kind", lambda w: tokenizer({"style": "lm1b", "tokenizer": {"kind": "sentencepiece"}})(w),
         ["tokenizer.kind", "sentencepiece"]),
        ("params_not_json", lambda w: __import__("bitstream.tokenizer", fromlist=["main"]).main(
            ["--corpus-dir", "x", "--params", "{style:", "--out-dir", str(w["base"] / "tok_out")]), ["--params", "JSON"]),
        ("cache_bits_too_small", lambda w: cache(lambda w: w["root"] / "tokenizer" / "base",
                                                 {"style": "lm1b", "seq_len": 4, "bits": 3})(w), ["bits = 3"]),
        ("cache_tokenizer_missing", lambda w: cache(lambda w: w["bad"] / "no_tokenizer")(w), ["no_tokenizer", "not found"]),
    ]


DATA_CASES = _data_cases()


@pytest.mark.parametrize("case, run, needles", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_data_stage_bad_input(world, capsys, case, run, needles):
    before = _snapshot(world["base"])
    _expect_one_line_exit(capsys, lambda: run(world), needles)
    assert _snapshot(world["base"]) == before


# ---- OS faults: no space, read-only, permission -> one line naming the path; old output intact ----


class _FullDisk:
    """A file whose writes fail with ENOSPC after ``budget`` bytes, like a filling disk."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, data):
        if len(data) > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_while_saving_a_checkpoint(tmp_path, monkeypatch, capsys):
    import builtins

    from bitstream import checkpoint, io

    target = tmp_path / "checkpoints" / "last.pt"
    _final(target)
    before = _snapshot(tmp_path)
    real_open = builtins.open
    monkeypatch.setattr(io, "open", lambda *a, **k: _FullDisk(real_open(*a, **k), 2000), raising=False)
    stage = io.stage_main("train")(lambda argv: _final(target, seed=1))
    line = _expect_one_line_exit(capsys, lambda: stage(None), [str(target), "no space left on device"])
    assert "unexpected pos" not in line
    assert _snapshot(tmp_path) == before   # the old last.pt is intact and no temporary file is left


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_read_only_or_forbidden_output(world, tmp_path, monkeypatch, capsys, code, needle):
    from bitstream import io
    from bitstream.sample import main

    def refuse(*a, **k):
        raise OSError(code, os.strerror(code), k.get("dir"))

    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    out = tmp_path / "ro" / "s.parquet"
    _expect_one_line_exit(capsys, lambda: main(_sample_argv(world, out=str(out))), [str(out), needle])
    assert not out.exists()


def test_stale_temporaries_are_removed_and_outputs_are_group_readable(tmp_path):
    from bitstream.io import atomic_dir, write_text

    target = tmp_path / "x.json"
    stale = tmp_path / ".x.json.abcd1234.tmp"          # what a SIGKILL during a save leaves behind
    stale.write_text("half")
    other = tmp_path / ".y.json.abcd1234.tmp"          # another output's: not ours to touch
    other.write_text("half")
    write_text(target, "{}")
    assert not stale.exists() and other.exists() and (target.stat().st_mode & 0o777) == 0o644
    stale_dir = tmp_path / ".tok.abcd1234"
    stale_dir.mkdir()
    with atomic_dir(tmp_path / "tok") as d:
        (d / "a").write_text("1")
    assert not stale_dir.exists() and (tmp_path / "tok" / "a").read_text() == "1"
    assert ((tmp_path / "tok").stat().st_mode & 0o777) == 0o755


def test_load_model_refuses_non_finite_weights(world):
    from bitstream.checkpoint import load_model

    with pytest.raises(ValueError, match="NaN/Inf"):
        load_model(world["bad"] / "nan.pt")


# ---- corpus encoding never pads or truncates, whatever tokenizer.json says ----


def test_cache_ignores_saved_padding_and_truncation(world, tmp_path):
    from tokenizers import Tokenizer

    from bitstream.token_cache import build_cache, load_cache

    src = world["root"] / "tokenizer" / "base"
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in src.iterdir():
        (tok_dir / f.name).write_bytes(f.read_bytes())
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    pad = json.loads((src / "meta.json").read_text())["pad_token_id"]
    tok.enable_padding(length=32, pad_id=pad, pad_token="[PAD]")   # like exported sentence-embedding models
    tok.enable_truncation(max_length=3)
    tok.save(str(tok_dir / "tokenizer.json"))
    params = {"style": "lm1b", "seq_len": 4, "bits": BITS}
    meta = build_cache(world["root"] / "corpus", tok_dir, "test", params, tmp_path / "c" / "test")
    ref = build_cache(world["root"] / "corpus", src, "test", params, tmp_path / "r" / "test")
    rows, _ = load_cache(tmp_path / "c" / "test")
    ref_rows, _ = load_cache(tmp_path / "r" / "test")
    assert meta["pad_tokens_in_rows"] == 0 and meta["padding"] is False and meta["truncation"] is False
    assert (rows == pad).sum() == 0 and rows.tolist() == ref_rows.tolist()
    assert meta["total_stream_tokens"] == ref["total_stream_tokens"]


# ---- workflow level: caught at validation time, before any job runs ----

WORKFLOW_CASES = [
    ("seeds_negative", ["--config", "seeds=[-1]"], ["-1 is less than the minimum of 0"]),
    ("seeds_repeated", ["--config", "seeds=[0,0]"], ["non-unique"]),
    ("bits_too_small", ["--config", "runs={lm1b_web:{bits:9}}"], ["runs.lm1b_web.bits = 9", "vocab_size"]),
    ("text_corpus_missing", ["--config", "runs={lm1b_web:{corpus:{source:'text:nope.txt'}}}"],
     ["runs.lm1b_web.corpus.source", "nope.txt"]),
    ("num_samples_zero", ["--config", "sampler_specs={det_nfe16:{num_samples:0}}"], ["0 is less than the minimum of 1"]),
]


@pytest.mark.parametrize("case, args, needles", WORKFLOW_CASES, ids=[c[0] for c in WORKFLOW_CASES])
def test_workflow_bad_config_caught_at_validation(tmp_path, case, args, needles):
    proc = snakemake("-n", "--cores", "1", "results/lm1b_web/corpus/meta.json", *args, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    for needle in needles:
        assert needle in text, (needle, text[-2000:])
    assert not (tmp_path / "results").exists()


def test_nested_config_override_keeps_the_other_keys(tmp_path):
    proc = snakemake("-n", "-p", "--cores", "1", "results/lm1b_web/models/sdt_tiny/checkpoints/final.pt",
                     "--config", "models={sdt_tiny:{training:{steps:10}}}", cwd=tmp_path)
    cmd = next(line for line in proc.stdout.splitlines() if "-m bitstream.train" in line)
    params = json.loads(cmd.split("--params ", 1)[1].split("' --out-dir")[0].strip("'"))
    assert params["training"]["steps"] == 10
    # the rest of sdt_tiny is the config file's, not the schema's paper-size defaults
    assert params["architecture"]["embed_dim"] == 128 and params["training"]["batch_size"] == 32


def test_editing_a_text_corpus_reruns_the_corpus(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(" ".join(WORDS[i:] + WORDS[:i]) + "\n" for i in range(len(WORDS))) * 20)
    args = ["--cores", "1", "results/lm1b_web/corpus/meta.json", "--config",
            f"runs={{lm1b_web:{{corpus:{{source:'text:{text}'}}}}}}"]
    snakemake(*args, cwd=tmp_path)
    assert "Nothing to be done" in snakemake("-n", *args, cwd=tmp_path).stdout
    os.utime(text, None)
    text.write_text(text.read_text() + "a new line of text\n")
    out = snakemake("-n", *args, cwd=tmp_path).stdout
    assert "rule corpus" in out and "Nothing to be done" not in out


# ---- the job wrapper hands signals to the trainer ----


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd and "pytest" not in cmd:
                pids.append(int(proc.name))
    return pids


def test_killing_the_train_jobs_wrapper_stops_the_trainer(tmp_path):
    """The train rule's shell command, run as Snakemake runs it (bash -c 'set -euo pipefail; ...'):
    killing that shell's PID must stop training. With `python ... | tee` the trainer kept running and
    wrote final.pt after Snakemake had reported the job failed."""
    import signal
    import time

    import numpy as np

    cfg = ["--config", "models={sdt_tiny:{architecture:{embed_dim:16,n_blocks:1,n_heads:2,dim_ff:32,content_dim:4,"
           "head_hidden:8},training:{steps:100000,batch_size:4,checkpoint_every:100000,log_every:1000,"
           "val_every:100000}}}"]
    target = "results/lm1b_web/models/sdt_tiny/checkpoints/final.pt"
    out = snakemake("-n", "-p", "--cores", "1", target, *cfg, cwd=tmp_path).stdout
    cmd = next(line for line in out.splitlines() if "-m bitstream.train" in line).strip()
    cmd = cmd.removeprefix("Shell command:").strip()
    params = json.loads(cmd.split("--params ", 1)[1].split("' --out-dir")[0].strip("'"))
    seq_len, bits = int(cmd.split("--seq-len ")[1].split()[0]), int(cmd.split("--bits ")[1].split()[0])
    cache = tmp_path / "results" / "lm1b_web" / "cache"
    cache.mkdir(parents=True)
    for split in ("train", "validation"):
        rows = np.random.default_rng(0).integers(0, 50, (64, seq_len)).astype(np.uint16)
        rows.tofile(cache / f"{split}.u16")
        (cache / f"{split}.meta.json").write_text(json.dumps({"n_rows": 64, "seq_len": seq_len, "vocab_size": 50,
                                                              "bits": bits, "dtype": "uint16"}))
    (tmp_path / "results" / "lm1b_web" / "logs").mkdir()
    assert params["training"]["steps"] == 100000
    wrapper = subprocess.Popen(["bash", "-c", f"set -euo pipefail; {cmd}"], cwd=tmp_path, start_new_session=True,
                               env=checkout_env())
    out_dir = str(tmp_path / "results" / "lm1b_web" / "models" / "sdt_tiny")
    attempts = Path(out_dir) / "train_attempts.log"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "start:" not in (attempts.read_text() if attempts.exists() else ""):
            time.sleep(0.2)
        assert "start:" in attempts.read_text(), "trainer did not start"
        wrapper.send_signal(signal.SIGKILL)           # the wrapper's PID, as a scheduler would
        wrapper.wait(timeout=10)
        time.sleep(1.0)
        survivors = [pid for pid in _processes_mentioning("--out-dir results/lm1b_web/models/sdt_tiny")
                     if Path(f"/proc/{pid}/cwd").resolve() == tmp_path.resolve()]
        assert not survivors, "trainer survived its wrapper"
        assert not (Path(out_dir) / "checkpoints" / "final.pt").exists()
    finally:
        os.killpg(wrapper.pid, signal.SIGKILL) if wrapper.poll() is None else None
        for pid in _processes_mentioning(f"--out-dir results/lm1b_web/models/sdt_tiny"):
            if Path(f"/proc/{pid}/cwd").resolve() == tmp_path.resolve():  # only the one this test started
                os.kill(pid, signal.SIGKILL)
