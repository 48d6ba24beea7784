"""The VLB in bits per bit (spec §9.5) on closed-form denoisers.

For independent uniform bits the matched filter is the exact posterior (spec §3), so the bound is the
true entropy, 1 bit per bit, up to the truncation of [σ_0, σ_max] (~1e-5) and Monte-Carlo noise. A
denoiser that always answers 0.5 has recon = ln 2 per bit exactly and an expected diffusion term of
¼ (σ_0⁻² − σ_max⁻²) / 2 nats per bit.
"""

from __future__ import annotations

import json
import math
import sys
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import torch

from bitstream import vlb

torch.set_num_threads(1)


def matched_filter(x, sigma, x0_hat):
    """ℓ = clip((x − ½)/σ², ±30): the matched_filter_only model (spec §3)."""
    assert x0_hat is None  # the contract's SC convention: absent = None
    return ((x - 0.5) / sigma[:, None] ** 2).clamp(-30, 30)


def coin(x, sigma, x0_hat):
    return torch.zeros_like(x)


def random_bits(n, s, seed=0):
    return np.random.default_rng(seed).integers(0, 2, (n, s))


def test_matched_filter_on_random_bits_is_one_bit_per_bit():
    r = vlb.vlb_bits_per_bit(matched_filter, random_bits(16384, 8), batch_size=4096, seed=0)
    assert all(math.isfinite(r[k]) for k in ("vlb_bpb", "recon_bpb", "diff_bpb", "prior_bpb"))
    assert r["vlb_bpb"] > 0 and r["recon_bpb"] < 1e-6  # at σ_0 = 0.08 the filter decides every bit
    assert r["vlb_bpb_sem"] < 0.03
    # an upper bound on −log2 p = 1 bit/bit, tight for the exact posterior
    assert abs(r["vlb_bpb"] - 1.0) < 5 * r["vlb_bpb_sem"] + 1e-3
    assert not r["include_prior"] and 1e-5 < r["prior_bpb"] < 1e-4  # ½·E[x0²]/80² / ln 2 ≈ 5.6e-5
    assert r["n_rows"] == 16384 and r["bits_per_row"] == 8


def test_coin_denoiser_closed_form():
    r = vlb.vlb_bits_per_bit(coin, random_bits(8192, 4), batch_size=2048, seed=1)
    assert r["recon_bpb"] == pytest.approx(1.0, abs=1e-6)
    expected_diff = 0.25 * (0.08 ** -2 - 80.0 ** -2) / 2 / math.log(2)
    assert abs(r["diff_bpb"] - expected_diff) < 5 * r["vlb_bpb_sem"]


def test_deterministic_for_a_seed_and_independent_of_batching():
    bits = random_bits(96, 12)
    a = vlb.vlb_bits_per_bit(matched_filter, bits, batch_size=32, seed=5)
    b = vlb.vlb_bits_per_bit(matched_filter, bits, batch_size=32, seed=5)
    c = vlb.vlb_bits_per_bit(matched_filter, bits, batch_size=32, seed=6)
    assert a == b and a["vlb_bpb"] != c["vlb_bpb"]
    with_prior = vlb.vlb_bits_per_bit(matched_filter, bits, batch_size=32, seed=5, include_prior=True)
    assert with_prior["vlb_bpb"] == pytest.approx(a["vlb_bpb"] + a["prior_bpb"])


def test_project_matched_filter_gives_the_same_bound():
    diffusion = pytest.importorskip("bitstream.diffusion")
    bits = random_bits(256, 8)

    def project_mf(x, sigma, x0_hat):
        return diffusion.matched_filter_logit(x, sigma)

    a = vlb.vlb_bits_per_bit(project_mf, bits, batch_size=64, seed=0)
    b = vlb.vlb_bits_per_bit(matched_filter, bits, batch_size=64, seed=0)
    assert a["vlb_bpb"] == pytest.approx(b["vlb_bpb"], rel=1e-5)


def test_cli_row(tmp_path, monkeypatch):
    """The stage wiring with stand-ins for the checkpoint, diffusion and cache modules."""
    width, seq_len = 4, 3
    rows = np.random.default_rng(0).integers(0, 2 ** width, (50, seq_len)).astype(np.uint16)
    calls = {}

    def load_model(path, device="cpu"):
        calls["device"] = device
        return object(), {"bits": width, "seq_len": seq_len, "step": 7,
                          "architecture": {"logit_mode": "matched_filter_only", "mf_clip": 30.0}}

    def denoise_logits(net, x, sigma, x0_hat, mode="matched_filter_residual", clip=30.0):
        calls["mode"] = mode
        return matched_filter(x, sigma, x0_hat)

    fakes = {"bitstream.checkpoint": {"load_model": load_model},
             "bitstream.diffusion": {"denoise_logits": denoise_logits},
             "bitstream.token_cache": {"load_cache": lambda prefix, expect=None: (rows, {})}}
    for name, attrs in fakes.items():
        mod = ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)

    ckpt = tmp_path / "results" / "lm1b_web" / "models" / "sdt_tiny" / "checkpoints" / "final.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"stand-in")
    out = tmp_path / "vlb.parquet"
    params = json.dumps({"vlb_batches": 4, "vlb_batch_size": 8, "resources": {"gpus": 0}})
    vlb.main(["--checkpoint", str(ckpt), "--cache-dir", str(tmp_path), "--params", params, "--out", str(out),
              "--device", "cpu"])
    row = pd.read_parquet(out).iloc[0]
    assert (row["run"], row["model"], row["step"]) == ("lm1b_web", "sdt_tiny", 7)
    assert row["n_rows"] == 32 and row["bits_per_row"] == width * seq_len
    assert calls["mode"] == "matched_filter_only"
    expected = vlb.vlb_bits_per_bit(matched_filter, ((rows[:32, :, None] >> np.arange(3, -1, -1)) & 1)
                                    .reshape(32, -1), batch_size=8, seed=0)
    assert row["vlb_bpb"] == pytest.approx(expected["vlb_bpb"])
    assert row["code_version"] and row["config_hash"]
