"""Issue 9: importing the released CoBit files (official format) -- EMA rules, parity with the official
network and sampler, the self-conditioning convention, the official code tokenizer, hub paths, and
one clear refusal per kind of bad input. Fixtures: reference/official_format (made by running the
official code); every test skips with the reason when they are absent."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED_REFERENCE

from bitstream import hub
from bitstream.import_model import OfficialFormatError, import_weights, read_official, run_import

OFFICIAL = SHARED_REFERENCE / "official_format"
TINY = OFFICIAL / "tiny_sdt"
CODE = OFFICIAL / "code_tokenizer"
LM1B_TABLES = SHARED_REFERENCE / "entropy_tables" / "lm1b"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason=f"official-format fixtures not found under {OFFICIAL}")

# architecture.json of the fixture: P = 11 bits, L = 16 tokens (n_heads and rope_base are not in the file)
ARCH = dict(embed_dim=12, n_blocks=2, n_heads=2, dim_ff=36, content_dim=4, head_hidden=10)
BITS, SEQ_LEN = 11, 16


@pytest.fixture(scope="module")
def release():
    return import_weights(TINY / "release_checkpoint.pt", ARCH, BITS, SEQ_LEN)[0]


@pytest.fixture(scope="module")
def reference_io():
    return torch.load(TINY / "reference_io.pt", weights_only=True)


# ---------------------------------------------------------------------------------------------------
# EMA rules


def test_release_and_training_file_import_to_the_same_ema_weights(release):
    model, arch, info = import_weights(TINY / "train_checkpoint.pt", ARCH, BITS, SEQ_LEN)
    assert info["layout"] == "training" and info["ema_applied"] and info["ema_tensors"] == 49
    ours, theirs = release.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and len(ours) == 50
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the live weights of the training file are not what gets imported
    live = read_official(TINY / "train_checkpoint.pt")["model"]
    shadow = read_official(TINY / "train_checkpoint.pt")["ema"]["shadow"]
    assert all(not torch.equal(live[k], theirs[k]) for k in shadow)
    assert torch.equal(live["time_fn._freq"], theirs["time_fn._freq"])     # buffers stay
    assert arch["sc_absent"] == 0.0 and info["global_step"] == 3 and info["ema_decay"] == pytest.approx(0.9)


def test_prefixes_are_normalised(tmp_path, release):
    ckpt = read_official(TINY / "release_checkpoint.pt")
    ckpt["model"] = {f"module._orig_mod.{k}": v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "prefixed.pt")
    model = import_weights(tmp_path / "prefixed.pt", ARCH, BITS, SEQ_LEN)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), release.state_dict().values()))


# ---------------------------------------------------------------------------------------------------
# Parity with the official network and sampler


def test_logits_match_the_official_ones_for_all_three_sc_inputs(release, reference_io):
    r = reference_io
    x, sigma = r["x"], r["sigma"]
    half = torch.full_like(x, 0.5)   # upstream's x0_hat=None inside the model = raw zeros = probability 0.5
    with torch.no_grad():
        cases = {"probs": release.logits(x, sigma, r["x0_hat_probs"]),
                 "zeros": release.logits(x, sigma, r["x0_hat_absent_upstream"]),
                 "none": release.logits(x, sigma, half)}
        for name, ours in cases.items():
            err = (ours - r[f"logits_{name}"]).abs().max().item()
            print(f"logits_{name}: max |ours - official| = {err:.2e}")
            assert err < 1e-4, name
        # The imported model's "no estimate yet" (None) is upstream's zeros tensor ...
        assert torch.equal(release.logits(x, sigma, None), cases["zeros"])
        # ... and the live weights would be caught (they differ by up to 4.7 in logit)
        assert (r["logits_probs_live_weights"] - cases["probs"]).abs().max() > 0.5


def test_own_models_keep_probability_half_for_absent():
    from bitstream.checkpoint import build_model

    model = build_model(ARCH, BITS, SEQ_LEN).eval()
    for p in model.parameters():   # non-zero weights so the SC channel matters
        torch.nn.init.normal_(p, std=0.3)
    x, sigma = torch.rand(2, BITS * SEQ_LEN), torch.tensor([0.5, 2.0])
    assert model.cfg.sc_absent == 0.5
    with torch.no_grad():
        assert torch.equal(model(x, sigma, None), model(x, sigma, torch.full_like(x, 0.5)))
        assert not torch.equal(model(x, sigma, None), model(x, sigma, torch.zeros_like(x)))


@pytest.mark.skipif(not LM1B_TABLES.is_dir(), reason=f"released entropy tables not found at {LM1B_TABLES}")
def test_deterministic_sampler_reproduces_the_official_run(release):
    from bitstream.samplers import model_denoiser, plan_from_spec, run_plan

    ref = torch.load(OFFICIAL / "sampler_reference.pt", weights_only=True)
    # Upstream num_steps = 15 grid points = 14 DDIM steps + 1 final call = 15 calls (it reports "NFE 16");
    # our honest nfe 15 is the same run.
    plan = plan_from_spec({"sampler": "ddim_entropic", "nfe": 15, "terminal_sigma": 0.08, "sigma_max": 80.0,
                           "sc_mode": "carry"}, entropy_dir=LM1B_TABLES)
    grid_err = (plan.sigmas - ref["grid"].double()).abs().max().item()
    out = run_plan(plan, model_denoiser(release), ref["z"])
    prob_err = (out.probs - ref["probs_final"]).abs().max().item()
    print(f"grid max err {grid_err:.2e}, final prob max err {prob_err:.2e}, calls {out.nfe}")
    assert grid_err < 1e-5
    assert out.nfe == 15 == ref["x_in"].shape[0]
    assert torch.equal(out.bits, ref["bits"].to(torch.uint8))
    assert (out.x - ref["x_final"]).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------
# The stage: our model file, tables, provenance; the model file loads like a trained one


@pytest.mark.skipif(not LM1B_TABLES.is_dir(), reason=f"released entropy tables not found at {LM1B_TABLES}")
def test_run_import_writes_what_training_writes(tmp_path, release, reference_io):
    from bitstream.checkpoint import load_model

    params = {"source": "import", "architecture": ARCH,
              "import": {"checkpoint": str(TINY / "train_checkpoint.pt"), "entropy_tables": str(LM1B_TABLES)}}
    record = run_import(params, BITS, SEQ_LEN, tmp_path)
    assert record["layout"] == "training" and record["ema_applied"] and record["global_step"] == 3
    assert json.loads((tmp_path / "import.json").read_text())["sha256"] == record["sha256"]
    for t in ("pdf", "cdf", "sigmas", "edges"):
        assert (tmp_path / "entropy" / f"entropy_{t}.pt").read_bytes() == (LM1B_TABLES / f"entropy_{t}.pt").read_bytes()
    model, meta = load_model(tmp_path / "checkpoints" / "final.pt")
    assert meta["architecture"]["sc_absent"] == 0.0 and meta["step"] == 3
    r = reference_io
    with torch.no_grad():
        assert torch.equal(model.logits(r["x"], r["sigma"], None), release.logits(r["x"], r["sigma"], None))


# ---------------------------------------------------------------------------------------------------
# Refusals: each names the culprit


def test_refuses_a_training_file_without_ema_shadow(tmp_path):
    ckpt = read_official(TINY / "train_checkpoint.pt")
    del ckpt["ema"]
    torch.save(ckpt, tmp_path / "no_ema.pt")
    with pytest.raises(OfficialFormatError, match=r"no_ema\.pt: a training checkpoint with no 'ema' entry.*live"):
        import_weights(tmp_path / "no_ema.pt", ARCH, BITS, SEQ_LEN)
    ckpt["ema"] = {"decay": 0.9}
    torch.save(ckpt, tmp_path / "no_shadow.pt")
    with pytest.raises(OfficialFormatError, match=r"no_shadow\.pt: .*without a 'shadow'"):
        import_weights(tmp_path / "no_shadow.pt", ARCH, BITS, SEQ_LEN)


@pytest.mark.parametrize("override, key, config_key", [
    ({"embed_dim": 16, "n_heads": 2}, "patch_proj.weight", "architecture.embed_dim"),
    ({"content_dim": 8}, "cont_input_proj.weight", "architecture.content_dim"),
    ({"dim_ff": 48}, "blocks.0.ff.Wa.weight", "architecture.dim_ff"),
    ({"head_hidden": 12}, "head.patch_adapter.weight", "architecture.head_hidden"),
])
def test_refuses_a_shape_mismatch_naming_key_shapes_and_config_key(override, key, config_key):
    with pytest.raises(OfficialFormatError) as err:
        import_weights(TINY / "release_checkpoint.pt", {**ARCH, **override}, BITS, SEQ_LEN)
    msg = str(err.value)
    assert f"'{key}'" in msg and config_key in msg and msg.count("(") >= 2, msg
    assert "release_checkpoint.pt" in msg


def test_refuses_a_wrong_patch_size_and_block_count():
    with pytest.raises(OfficialFormatError, match=r"'patch_proj.weight'.*bits"):
        import_weights(TINY / "release_checkpoint.pt", ARCH, 12, SEQ_LEN)
    with pytest.raises(OfficialFormatError, match=r"2 transformer blocks, the config builds 3.*n_blocks"):
        import_weights(TINY / "release_checkpoint.pt", {**ARCH, "n_blocks": 3}, BITS, SEQ_LEN)


def test_refuses_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(OfficialFormatError, match=r"notes\.pt: not a readable checkpoint"):
        read_official(tmp_path / "notes.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(OfficialFormatError, match=r"other\.pt: not an official CoBit checkpoint.*'model'"):
        read_official(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        read_official(tmp_path / "missing.pt")


def test_refuses_a_hub_file_that_cannot_be_fetched_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))   # an empty cache
    value = "hub:gbatzolis/CoBit/checkpoints/cobit_s_lm1b_1M_ema.pt@main"
    with pytest.raises(FileNotFoundError) as err:
        hub.resolve_file(value, "checkpoint")
    msg = str(err.value)
    assert value in msg and "HF_HUB_OFFLINE" in msg and "local copy" in msg, msg
    with pytest.raises(FileNotFoundError, match=r"entropy_tables/lm1b/entropy_pdf\.pt"):
        hub.resolve_dir("hub:gbatzolis/CoBit/entropy_tables/lm1b", ["entropy_pdf.pt"], "entropy tables")


def test_hub_paths_parse_and_resolve_from_a_filled_cache(tmp_path, monkeypatch):
    p = hub.parse("hub:gbatzolis/CoBit/tokenizer/tokenizer_gpt2id_bpe16_65536_base1024.json@v1.0")
    assert (p.repo_id, p.filename, p.revision) == ("gbatzolis/CoBit", "tokenizer/tokenizer_gpt2id_bpe16_65536_base1024.json", "v1.0")
    assert hub.parse("hub:a/b/c/d.pt").revision is None and str(hub.parse("hub:a/b/c.pt@r")) == "hub:a/b/c.pt@r"
    with pytest.raises(ValueError, match="owner and repo"):
        hub.parse("hub:justone")
    # A cache filled the way hf_hub_download fills it is used offline, and the commit is recorded.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--gbatzolis--CoBit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit / "checkpoints"
    snap.mkdir(parents=True)
    (snap / "tiny.pt").write_bytes((TINY / "release_checkpoint.pt").read_bytes())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    local, prov = hub.resolve_file("hub:gbatzolis/CoBit/checkpoints/tiny.pt", "checkpoint")
    assert local.read_bytes() == (TINY / "release_checkpoint.pt").read_bytes()
    assert prov["commit"] == commit and prov["repo_id"] == "gbatzolis/CoBit"


# ---------------------------------------------------------------------------------------------------
# The official OWT code tokenizer


@pytest.mark.skipif(not CODE.is_dir(), reason=f"code tokenizer fixture not found at {CODE}")
def test_official_code_tokenizer_encodes_and_decodes_like_upstream():
    from bitstream.codec import InverseCodec, frame_codes, given_code_tokenizer, ids_to_pua

    tok, origin = given_code_tokenizer(str(CODE / "tokenizer_gpt2id_bpe16_51200_base64.json"), 50257, 50256)
    assert origin["official_meta"]["base_char_offset"] == 0xF0000
    ref = json.loads((CODE / "reference_pairs.json").read_text())
    assert tok.token_to_id("\n") == ref["vocab_facts"]["newline_char_id"] == 3     # not our layout: read ids
    pieces = [""] * tok.get_vocab_size()
    for piece, i in tok.get_vocab(with_added_tokens=True).items():
        pieces[i] = piece
    inverse = InverseCodec(pieces, 50257, 50256)
    n = ref["code_sequence_len_tokens"]
    for pair in ref["pairs"]:
        codes = tok.encode(ids_to_pua(pair["base_ids"]), add_special_tokens=False).ids
        assert codes == pair["code_ids_encode"], pair["source"]
        assert frame_codes(codes, n)[0].tolist() == pair["code_ids_fixed"], pair["source"]
        assert inverse(pair["code_ids_fixed"]) == pair["decoded_base_ids"], pair["source"]
    assert len(ref["pairs"]) == 20


@pytest.mark.skipif(not CODE.is_dir(), reason=f"code tokenizer fixture not found at {CODE}")
def test_official_code_tokenizer_meta_must_fit_the_run():
    from bitstream.codec import given_code_tokenizer

    path = str(CODE / "tokenizer_gpt2id_bpe16_51200_base64.json")
    with pytest.raises(ValueError, match=r"meta\.json: code tokenizer meta does not fit.*eos_token_id_gpt2"):
        given_code_tokenizer(path, 50257, 0)
    with pytest.raises(ValueError, match=r"base_seq_len_tokens = 64 \(this run needs 1024\)"):
        given_code_tokenizer(path, 50257, 50256, base_seq_len=1024)
    given_code_tokenizer(path, 50257, 50256, base_seq_len=64)


@pytest.mark.skipif(not CODE.is_dir(), reason=f"code tokenizer fixture not found at {CODE}")
def test_official_code_tokenizer_from_a_hub_path(tmp_path, monkeypatch):
    """``code_tokenizer.path: hub:...`` fetches the JSON and its .meta.json through huggingface_hub."""
    from bitstream.codec import given_code_tokenizer

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--gbatzolis--CoBit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit / "tokenizer"
    snap.mkdir(parents=True)
    for name in ("tokenizer_gpt2id_bpe16_51200_base64.json", "tokenizer_gpt2id_bpe16_51200_base64.meta.json"):
        (snap / name).write_bytes((CODE / name).read_bytes())
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    tok, origin = given_code_tokenizer("hub:gbatzolis/CoBit/tokenizer/tokenizer_gpt2id_bpe16_51200_base64.json",
                                       50257, 50256, base_seq_len=64)
    assert origin["commit"] == commit and origin["official_meta"]["recommended_code_seq_len_tokens"] == 63
    assert tok.get_vocab_size() == 51200
