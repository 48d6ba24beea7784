"""Training stage (bitstream.train): resume exactness, DDP = single process, entropy schedule switch-on,
loss falls, outputs. Tiny model and a tiny synthetic token cache; CPU only."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from bitstream import train as tr

REPO = Path(__file__).resolve().parent.parent
BITS, SEQ_LEN, VOCAB = 6, 8, 50

TINY = {
    "architecture": {"embed_dim": 32, "n_blocks": 1, "n_heads": 2, "dim_ff": 64, "content_dim": 8,
                     "head_hidden": 16, "dropout": 0.0},
    "training": {"steps": 40, "batch_size": 8, "lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 5, "ema_decay": 0.9,
                 "checkpoint_every": 10, "keep_every": 20, "log_every": 5, "val_every": 10, "val_batches": 2,
                 "num_threads": 1, "seed": 7,
                 "entropy": {"buffer_size": 2000, "num_bins": 8, "min_per_bin": 4, "update_every": 10,
                             "warmup_steps": 15, "transition_steps": 10}},
    "resources": {"cpus": 1},
}
LOG_COLUMNS = {"step", "loss", "val_loss", "lr", "grad_norm", "entropy_gamma", "entropy_ready", "sigma_median",
               "sigma_p10", "sigma_p90", "log_sigma_mean", "log_sigma_std", "wall_time_s", "steps_per_s",
               "bits_per_s", "code_version", "config_hash"}


def make_cache(directory: Path, n_train: int = 256, n_val: int = 32, seed: int = 0) -> Path:
    """A learnable toy cache in the token_cache format: arithmetic progressions mod VOCAB."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("validation", n_val)):
        start, stride = rng.integers(0, VOCAB, (n, 1)), rng.integers(1, 3, (n, 1))
        rows = ((start + stride * np.arange(SEQ_LEN)) % VOCAB).astype(np.uint16)
        rows.tofile(directory / f"{split}.u16")
        meta = {"n_rows": n, "seq_len": SEQ_LEN, "n_sequences": n, "seq_len_tokens": SEQ_LEN,
                "vocab_size": VOCAB, "dtype": "uint16"}
        (directory / f"{split}.meta.json").write_text(json.dumps(meta))
    return directory


def params(**training) -> dict:
    p = copy.deepcopy(TINY)
    entropy = training.pop("entropy", {})
    p["training"].update(training)
    p["training"]["entropy"].update(entropy)
    return p


def weights(path: Path, key: str = "model") -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj[key] if key != "ema" else obj["ema"]["shadow"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return make_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run of TINY (entropy schedule ready at step 10, mixing from step 16)."""
    out = tmp_path_factory.mktemp("straight")
    summary = tr.train(cache, BITS, SEQ_LEN, params(), out, device="cpu", quiet=True)
    return out, summary


# ---------------------------------------------------------------------------------------------------
# Pieces


def test_defaults_match_the_schema():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["$defs"]

    def defaults(name):
        out = {}
        for key, spec in schema[name]["properties"].items():
            if "$ref" in spec and spec["$ref"].split("/")[-1] in schema and "properties" in schema[spec["$ref"].split("/")[-1]]:
                out[key] = defaults(spec["$ref"].split("/")[-1])
            else:
                out[key] = spec["default"]
        return out

    assert tr.TRAINING_DEFAULTS == defaults("training")
    assert tr.ARCHITECTURE_DEFAULTS == defaults("architecture")
    assert tr.RESOURCES_DEFAULTS == defaults("resources")
    with pytest.raises(ValueError, match="training: unknown key.*lrate"):
        tr.fill_defaults({"training": {"lrate": 1.0}})


def test_lr_schedule_first_step_uses_warmup_lr():
    """Spec §13 warm-up + cosine; the first step runs at lr/warmup, not the full lr (fix of §14.10)."""
    f = tr.WarmupCosine(lr=1e-3, min_lr=1e-5, warmup=10, total=100)
    lrs = [f.lr_at(k) for k in range(100)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)      # what step 1 will use
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_data_order_is_independent_of_world_size():
    b = tr.GlobalBatches(n_rows=20, global_batch=8, seed=3)
    steps = [b.indices(s) for s in range(5)]                       # 40 positions = 2 epochs
    stream = np.concatenate(steps)
    assert sorted(stream[:20]) == list(range(20)) and sorted(stream[20:40]) == list(range(20))
    for s in range(5):
        split = np.concatenate([b.indices(s, r, 4) for r in range(4)])
        assert np.array_equal(split, steps[s])
    assert np.array_equal(tr.GlobalBatches(20, 8, 3).indices(4), steps[4])      # stateless in the step


def test_global_draw_is_sliced_per_rank():
    t = tr.fill_defaults(params())["training"]
    draws = []
    for rank in range(2):
        gen, ngen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        draws.append(tr.draw_batch(8, 12, t, True, gen, ngen, None, 0, tr.Dist(rank, 2)))
    gen, ngen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    whole = tr.draw_batch(8, 12, t, True, gen, ngen, None, 0, tr.Dist(0, 1))
    assert torch.equal(torch.cat([d.sigma for d in draws]), whole.sigma)
    assert torch.equal(torch.cat([d.noise for d in draws]), whole.noise)
    assert torch.equal(torch.cat([d.sc for d in draws]), whole.sc)
    assert not torch.equal(draws[0].noise, draws[1].noise)          # §14.2: ranks get different noise


# ---------------------------------------------------------------------------------------------------
# Whole runs


def test_outputs_log_and_load_model(straight):
    from bitstream.checkpoint import load_model
    from bitstream.model import SDT

    out, summary = straight
    for name in ("pdf", "cdf", "sigmas", "edges"):
        assert (out / "entropy" / f"entropy_{name}.pt").exists()
    assert (out / "checkpoints" / "last.pt").exists() and (out / "checkpoints" / "step=000000020.pt").exists()
    log = pd.read_parquet(out / "train_log.parquet")
    assert LOG_COLUMNS <= set(log.columns)
    assert log["step"].tolist() == list(range(5, 41, 5))
    assert log["val_loss"].notna().tolist() == [s % 10 == 0 for s in log["step"]]
    assert (log["bits_per_s"] / log["steps_per_s"]).round().eq(8 * SEQ_LEN * BITS).all()

    model, meta = load_model(out / "checkpoints" / "final.pt")
    assert isinstance(model, SDT) and not model.training
    assert (meta["bits"], meta["seq_len"], meta["step"]) == (BITS, SEQ_LEN, 40)
    assert meta["architecture"]["embed_dim"] == 32 and meta["training"]["steps"] == 40
    assert {"code_version", "config_hash"} <= set(meta)
    ema = weights(out / "checkpoints" / "last.pt", "ema")
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    x = torch.rand(3, SEQ_LEN * BITS)
    assert model(x, torch.full((3,), 0.5)).shape == (3, SEQ_LEN * BITS)


def test_entropy_schedule_switches_on(straight):
    from bitstream.schedule import EntropySchedule

    out, summary = straight
    log = pd.read_parquet(out / "train_log.parquet")
    assert summary["entropy_ready_step"] == 10                    # first rebuild: 80 pairs >= 8 bins x 4
    assert summary["entropy_first_gamma_step"] == 17              # γ(16) = 0.1 is the 17th step's draw
    assert (log.loc[log["step"] <= 15, "entropy_gamma"] == 0).all()
    assert log["entropy_gamma"].iloc[-1] == pytest.approx(1.0)
    assert log.loc[log["step"] >= 10, "entropy_ready"].all() and not log["entropy_ready"].iloc[0]
    tables = EntropySchedule.from_dir(out / "entropy")
    assert tables.pdf.shape == (8,) and tables.edges.shape == (9,)
    assert float(tables.pdf.sum()) == pytest.approx(1.0, abs=1e-6)
    assert bool((tables.cdf[1:] >= tables.cdf[:-1]).all()) and float(tables.cdf[-1]) == 1.0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(state["entropy"]["tables"]["pdf"], tables.pdf)
    # The buffer holds exactly the training pairs: 40 steps x 8 examples, no validation pairs (§14.5).
    assert len(state["entropy"]["buffer"]["sigma"]) == 40 * 8


def test_killed_and_resumed_run_ends_with_identical_weights(straight, cache, tmp_path):
    out, _ = straight
    tr.train(cache, BITS, SEQ_LEN, params(), tmp_path, device="cpu", quiet=True, stop_after=13)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 13 and not (tmp_path / "checkpoints" / "final.pt").exists()
    tr.train(cache, BITS, SEQ_LEN, params(), tmp_path, device="cpu", quiet=True)
    for key in ("model", "ema"):
        a, b = weights(out / "checkpoints" / "last.pt", key), weights(tmp_path / "checkpoints" / "last.pt", key)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = weights(out / "checkpoints" / "final.pt"), weights(tmp_path / "checkpoints" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (pd.read_parquet(p / "train_log.parquet") for p in (out, tmp_path))
    cols = ["step", "loss", "val_loss", "lr", "grad_norm", "entropy_gamma", "sigma_median"]
    pd.testing.assert_frame_equal(la[cols], lb[cols])


def test_resume_refuses_another_config(straight, cache, tmp_path):
    tr.train(cache, BITS, SEQ_LEN, params(), tmp_path, device="cpu", quiet=True, stop_after=3)
    changed = params(lr=2e-3, entropy={"num_bins": 16})
    with pytest.raises(ValueError) as err:
        tr.train(cache, BITS, SEQ_LEN, changed, tmp_path, device="cpu", quiet=True)
    msg = str(err.value)
    assert "training.lr (saved 0.001, requested 0.002)" in msg and "training.entropy.num_bins" in msg
    assert "last.pt" in msg and "Delete" in msg
    # Observation-only keys may change on resume.
    tr.train(cache, BITS, SEQ_LEN, params(log_every=10, val_every=20), tmp_path, device="cpu", quiet=True,
             stop_after=4)


def test_loss_falls(cache, tmp_path):
    from contextlib import nullcontext

    from bitstream.checkpoint import build_model, load_model

    p = params(steps=100, lr=3e-3, log_every=20, val_every=20, entropy={"enabled": False})
    tr.train(cache, BITS, SEQ_LEN, p, tmp_path, device="cpu", quiet=True)
    log = pd.read_parquet(tmp_path / "train_log.parquet")
    val = log["val_loss"].dropna().to_numpy()
    cfg = tr.fill_defaults(p)
    rows, _ = tr.open_split(cache, "validation", BITS, SEQ_LEN)

    def val_loss(model):
        return tr.validate(model, rows, BITS, cfg["architecture"], cfg["training"], tr.Dist(), nullcontext)

    # Validation uses one fixed σ/noise draw, so it is comparable over steps (and with the untrained
    # model, which is exactly the matched-filter denoiser): it must go down.
    untrained = val_loss(build_model(cfg["architecture"], BITS, SEQ_LEN).eval())
    assert val[-1] < val[0] and val[-1] < 0.97 * untrained, (untrained, val)
    # final.pt holds the EMA weights the last validation used.
    assert val_loss(load_model(tmp_path / "checkpoints" / "final.pt")[0]) == pytest.approx(val[-1], rel=1e-6)
    assert all(math.isfinite(v) for v in log["loss"])
    # The schedule never switched on: the tables are still written, built from the buffer at the end.
    assert (tmp_path / "entropy" / "entropy_pdf.pt").exists()


def test_ddp_two_processes_match_one(straight, cache, tmp_path):
    """torchrun with 2 CPU processes (gloo), global batch 8 = 4 + 4, vs. one process with batch 8."""
    out, _ = straight
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "bitstream.train", "--cache-dir", str(cache), "--bits", str(BITS), "--seq-len", str(SEQ_LEN),
           "--params", json.dumps(params()), "--out-dir", str(tmp_path), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for key in ("model", "ema"):
        a, b = weights(out / "checkpoints" / "last.pt", key), weights(tmp_path / "checkpoints" / "last.pt", key)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}.{k}: {m}")
    sa = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    sb = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert sb["world_size"] == 2
    # Same σ draws and the whole global batch in the buffer (fix of §14.5), in the same order.
    assert torch.equal(sa["entropy"]["buffer"]["sigma"], sb["entropy"]["buffer"]["sigma"])
    torch.testing.assert_close(sb["entropy"]["buffer"]["mse"], sa["entropy"]["buffer"]["mse"], rtol=1e-4, atol=1e-7)


def test_stop_at_step_finishes_early_on_the_full_schedule(straight, cache, tmp_path):
    """stop_at_step = N of a 40-step schedule gives final outputs at N equal to the straight run's
    state at N (same lr schedule), and clearing it continues the same run to the end."""
    out, _ = straight
    tr.train(cache, BITS, SEQ_LEN, params(stop_at_step=20, keep_every=20), tmp_path, device="cpu", quiet=True)
    final = torch.load(tmp_path / "checkpoints" / "final.pt", weights_only=True)
    assert final["meta"]["step"] == 20
    kept_straight = weights(out / "checkpoints" / "step=000000020.pt", "ema")
    assert all(torch.equal(final["model"][k], kept_straight[k]) for k in final["model"])
    tr.train(cache, BITS, SEQ_LEN, params(), tmp_path, device="cpu", quiet=True)
    a, b = weights(out / "checkpoints" / "final.pt"), weights(tmp_path / "checkpoints" / "final.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint(cache, tmp_path, monkeypatch, capsys):
    """Issue 13: a NaN/Inf loss or gradient stops training at that step: last.pt stays the last good
    state, final.pt is never written, and the stage ends with one line (exit 2) naming the step."""
    from bitstream import train_optim
    from bitstream.io import StageExit

    out = tmp_path / "run"
    tr.train(cache, BITS, SEQ_LEN, params(), out, device="cpu", stop_after=10, quiet=True)
    last = out / "checkpoints" / "last.pt"
    good = last.read_bytes()
    real = train_optim.optimizer_step
    calls = {"n": 0}

    def poisoned(loss, *a, **k):
        calls["n"] += 1
        return real(loss * float("nan") if calls["n"] == 3 else loss, *a, **k)   # step 13 goes NaN

    monkeypatch.setattr("bitstream.train_step.optimizer_step", poisoned)
    argv = ["--cache-dir", str(cache), "--bits", str(BITS), "--seq-len", str(SEQ_LEN), "--params",
            json.dumps(params()), "--out-dir", str(out), "--device", "cpu"]
    with pytest.raises(StageExit) as info:
        tr.main(argv)
    assert info.value.code == 2
    msg = str(info.value)
    assert "diverged at step 13" in msg and "nan" in msg and "last.pt (step 10)" in msg, msg
    assert last.read_bytes() == good and not (out / "checkpoints" / "final.pt").exists()
    assert not list((out / "checkpoints").glob(".*"))


def test_huge_lr_diverges_with_a_message_not_a_nan_model(cache, tmp_path):
    """The case that used to finish with exit 0 and a NaN final.pt: lr 1e6."""
    from bitstream.io import UserError

    out = tmp_path / "run"
    with pytest.raises(UserError, match="diverged at step .*training.lr 1e\\+06"):
        tr.train(cache, BITS, SEQ_LEN, params(lr=1e6, warmup_steps=0), out, device="cpu", quiet=True)
    assert not (out / "checkpoints" / "final.pt").exists()
    if (out / "checkpoints" / "last.pt").exists():   # whatever was saved is finite and resumable
        from bitstream import checkpoint as ck

        state = ck.load(out / "checkpoints" / "last.pt")
        ck.check_finite(state["model"], "last.pt")


def test_resume_refuses_a_non_finite_training_state(straight, cache, tmp_path):
    from bitstream import checkpoint as ck

    out = tmp_path / "run"
    tr.train(cache, BITS, SEQ_LEN, params(), out, device="cpu", stop_after=10, quiet=True)
    state = ck.load(out / "checkpoints" / "last.pt")
    name = next(iter(state["model"]))
    state["model"][name] = state["model"][name].clone().fill_(float("inf"))
    ck.save(out / "checkpoints" / "last.pt", state)
    with pytest.raises(ValueError, match="NaN/Inf"):
        tr.train(cache, BITS, SEQ_LEN, params(), out, device="cpu", quiet=True)
    assert not (out / "checkpoints" / "final.pt").exists()
