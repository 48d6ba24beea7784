"""The sample stage with a tiny *untrained* SDT: its gates are zero, so SDT + matched filter is exactly the
analytic independent-bit denoiser (spec §3) and every outcome has a closed form."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bitstream.samplers import SampleNoise, model_denoiser, plan_from_spec, sample_ddim

torch.set_num_threads(1)

ARCH = {"embed_dim": 16, "n_blocks": 1, "n_heads": 2, "dim_ff": 32, "content_dim": 4, "head_hidden": 8,
        "dropout": 0.0, "rope_base": 10000.0, "self_condition": True, "logit_mode": "matched_filter_residual",
        "mf_clip": 30.0}
BITS, SEQ_LEN = 7, 6


@pytest.fixture(scope="module")
def sdt():
    from bitstream.checkpoint import build_model

    torch.manual_seed(0)
    return build_model(ARCH, BITS, SEQ_LEN).eval()


def test_untrained_sdt_is_the_matched_filter(sdt):
    """One call from a known state: ℓ = (x − ½)/σ² (clipped), i.e. D = sigmoid((x − ½)/σ²)."""
    denoise = model_denoiser(sdt)
    x = 0.5 + 1.7 * torch.randn(3, BITS * SEQ_LEN, generator=torch.Generator().manual_seed(1))
    for sigma in (0.08, 0.9, 40.0):
        label = torch.full((3,), sigma)
        for x0_hat in (None, torch.rand_like(x)):
            logits = denoise(x, label, x0_hat)
            assert logits.dtype == torch.float32
            torch.testing.assert_close(logits, ((x - 0.5) / sigma**2).clamp(-30, 30), rtol=1e-6, atol=1e-6)


def test_untrained_sdt_samples_fair_coins(sdt):
    denoise = model_denoiser(sdt)
    plan = plan_from_spec({"sampler": "ddim_karras", "nfe": 12, "gamma": 0.2, "window": "full"})
    noise = SampleNoise(0, range(32))
    lat = noise.randn(BITS * SEQ_LEN)
    det = sample_ddim(denoise, lat, plan.sigmas)
    assert torch.equal(det.bits, (lat > 0).to(torch.uint8))      # sign-preserving flow, see test_sampling_samplers
    out = sample_ddim(denoise, lat, plan.sigmas, randn_like=noise.randn_like, **plan.sampler_kwargs())
    n = out.bits.numel()
    assert abs(out.bits.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)


def test_micro_batch_does_not_change_the_samples(sdt):
    from bitstream.sample import generate_bits

    denoise = model_denoiser(sdt)
    plan = plan_from_spec({"sampler": "ddim_karras", "nfe": 8, "gamma": 0.2, "window": "full"})
    a, sa = generate_bits(denoise, plan, BITS * SEQ_LEN, 16, 4, seed=3)
    b, sb = generate_bits(denoise, plan, BITS * SEQ_LEN, 16, 16, seed=3)
    c, _ = generate_bits(denoise, plan, BITS * SEQ_LEN, 16, 16, seed=3)
    d, _ = generate_bits(denoise, plan, BITS * SEQ_LEN, 16, 16, seed=4)
    assert a.dtype == np.uint8 and a.shape == (16, BITS * SEQ_LEN)
    assert np.array_equal(a, b) and np.array_equal(b, c) and not np.array_equal(c, d)
    assert sa["nfe"] == sb["nfe"] == 8 and sa["network_calls"] == 4 * 8 and sb["network_calls"] == 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sdt):
    """results/{run} with a tiny WordPiece tokenizer (vocab < 2**BITS, so some codes are invalid), a
    final.pt of the untrained SDT and entropy tables."""
    from bitstream import checkpoint
    from bitstream.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("results") / "toy"
    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    words = "in the beginning god created the heavens and the earth now the earth was formless and empty".split()
    lines = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    (corpus / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    meta = build_tokenizer(corpus, {"style": "lm1b", "tokenizer": {"kind": "wordpiece", "vocab_size": 90},
                                    "bits": BITS}, root / "tokenizer" / "base")
    assert meta["vocab_size"] < 2**BITS
    model_dir = root / "models" / "tiny"
    checkpoint.save(model_dir / "checkpoints" / "final.pt", {
        "format": checkpoint.MODEL_FORMAT, "model": sdt.state_dict(),
        "meta": {"architecture": ARCH, "training": {"sigma_data": 0.5}, "bits": BITS, "seq_len": SEQ_LEN, "step": 0}})
    from bitstream.schedule import EntropySchedule

    edges = torch.logspace(math.log10(0.002), math.log10(80.0), 17)
    pdf = torch.full((16,), 1 / 16)
    EntropySchedule(pdf=pdf, cdf=pdf.cumsum(0), sigmas=(edges[1:] * edges[:-1]).sqrt(),
                    edges=edges).save(model_dir / "entropy")
    return root, meta["vocab_size"]


def _cli(root, spec, seed, out, extra=()):
    from bitstream.sample import main

    model_dir = root / "models" / "tiny"
    main(["--checkpoint", str(model_dir / "checkpoints" / "final.pt"), "--entropy-dir", str(model_dir / "entropy"),
          "--run-dir", str(root), "--spec", spec, "--seed", str(seed), "--out", str(out), "--device", "cpu", *extra])
    return pd.read_parquet(out)


def test_sample_cli_writes_the_contract_parquet(run_dir, tmp_path):
    root, vocab = run_dir
    spec = {"sampler": "ddim_entropic", "nfe": 6, "gamma": 0.2, "num_samples": 10, "micro_batch": 4}
    out = tmp_path / "samples" / "seed5.parquet"
    df = _cli(root, json.dumps(spec), 5, out, ["--spec-name", "sto"])
    assert len(df) == 10 and list(df["sample_index"]) == list(range(10))
    assert set(df["run"]) == {"toy"} and set(df["model"]) == {"tiny"} and set(df["spec"]) == {"sto"}
    for col in ("seed", "model_ids", "base_ids", "text", "n_invalid", "sampler", "nfe", "network_calls", "gamma",
                "s_noise", "window", "window_lo", "window_hi", "q_lo", "q_hi", "sc_mode", "eta", "terminal_sigma",
                "grid", "num_samples", "micro_batch", "wall_time_s", "samples_per_s", "calls_per_s", "device",
                "torch_version", "code_version", "config_hash"):
        assert col in df.columns, col
    row = df.iloc[0]
    assert row["nfe"] == 6 and row["network_calls"] == 3 * 6 and row["grid"] == "entropic"
    assert row["window_lo"] == pytest.approx(0.08) and row["samples_per_s"] > 0
    ids = np.stack(df["model_ids"].map(np.asarray).tolist())
    assert ids.shape == (10, SEQ_LEN) and ids.max() < 2**BITS
    # invalid codes (ids >= V) are counted, and never wrapped modulo V (spec §14.12)
    assert df["n_invalid"].tolist() == (ids >= vocab).sum(axis=1).tolist() and df["n_invalid"].sum() > 0
    base = np.stack(df["base_ids"].map(np.asarray).tolist())
    assert np.all(base < vocab)
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())  # atomic write left nothing behind

    # same seed, other micro-batch -> same samples; the config form of --spec works too
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"sampler_specs": {"sto": {**spec, "micro_batch": 10}}}))
    again = _cli(root, f"{cfg}:sto", 5, tmp_path / "again.parquet")
    assert again["model_ids"].map(list).tolist() == df["model_ids"].map(list).tolist()
    assert again["text"].tolist() == df["text"].tolist() and again["spec"].iloc[0] == "sto"


def test_sample_cli_refuses_missing_tables(run_dir, tmp_path):
    root, _ = run_dir
    from bitstream.sample import main

    with pytest.raises(SystemExit, match="entropy tables missing"):
        main(["--checkpoint", str(root / "models" / "tiny" / "checkpoints" / "final.pt"),
              "--entropy-dir", str(tmp_path / "nowhere"), "--run-dir", str(root), "--seed", "0",
              "--spec", json.dumps({"sampler": "ddim_entropic", "nfe": 4}), "--out", str(tmp_path / "x.parquet")])
    assert not (tmp_path / "x.parquet").exists()
