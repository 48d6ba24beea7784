"""bitstream.checkpoint: prefix stripping, strict loading (spec §14.11), config refusal, load_model."""

from __future__ import annotations

import pytest
import torch

from bitstream import checkpoint as ck

ARCH = {"embed_dim": 32, "n_blocks": 1, "n_heads": 2, "dim_ff": 64, "content_dim": 8, "head_hidden": 16,
        "dropout": 0.0}


def model_file(path, arch=ARCH, bits=6, seq_len=8, step=5):
    torch.manual_seed(0)
    model = ck.build_model(arch, bits, seq_len)
    ck.save(path, {"format": ck.MODEL_FORMAT, "model": model.state_dict(),
                   "meta": {"architecture": arch, "training": {"sigma_data": 0.5}, "bits": bits,
                            "seq_len": seq_len, "step": step}})
    return model


def test_clean_state_dict_strips_ddp_and_compile_prefixes():
    sd = {"module._orig_mod.a.weight": 1, "_orig_mod.module.b": 2, "c.module.d": 3}
    assert ck.clean_state_dict(sd) == {"a.weight": 1, "b": 2, "c.module.d": 3}


def test_config_mismatches_name_every_key():
    saved = {"training": {"lr": 1e-3, "entropy": {"num_bins": 8}, "log_every": 5}, "bits": 6}
    req = {"training": {"lr": 2e-3, "entropy": {"num_bins": 8}, "log_every": 50}, "bits": 7, "extra": 1}
    bad = ck.config_mismatches(saved, req, ignore=["training.log_every"])
    assert bad == ["bits (saved 6, requested 7)", "extra (saved '<absent>', requested 1)",
                   "training.lr (saved 0.001, requested 0.002)"]
    with pytest.raises(ValueError, match=r"x\.pt: .*bits .*training\.lr.*Delete it"):
        ck.check_config(saved, req, "x.pt", ignore=["training.log_every", "extra"], hint="Delete it")
    assert ck.config_mismatches(saved, saved) == []


def test_load_model_round_trip_and_strictness(tmp_path):
    ref = model_file(tmp_path / "final.pt")
    model, meta = ck.load_model(tmp_path / "final.pt")
    assert not model.training and meta["bits"] == 6 and meta["step"] == 5
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())

    # Expectations on the meta are checked and the keys named.
    with pytest.raises(ValueError, match=r"bits \(saved 6, requested 7\)"):
        ck.load_model(tmp_path / "final.pt", expect={"bits": 7, "seq_len": 8})

    # Weights of another architecture are refused, never half-loaded (fix of spec §14.11).
    other = ck.build_model({**ARCH, "head_hidden": 8}, 6, 8)
    with pytest.raises(ValueError, match=r"shape mismatch .*head\."):
        ck.load_state_dict_strict(other, ref.state_dict(), "final.pt")
    deeper = ck.build_model({**ARCH, "n_blocks": 2}, 6, 8)
    with pytest.raises(ValueError, match=r"missing \d+: blocks\.1\."):
        ck.load_state_dict_strict(deeper, ref.state_dict(), "final.pt")
    # A DDP / compiled state dict loads fine.
    ck.load_state_dict_strict(other := ck.build_model(ARCH, 6, 8),
                              {f"module._orig_mod.{k}": v for k, v in ref.state_dict().items()}, "x")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in other.state_dict().items())


def test_load_refuses_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ck.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a bitstream checkpoint"):
        ck.load(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        ck.load(tmp_path / "junk.pt")
