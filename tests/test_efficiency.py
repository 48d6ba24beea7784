"""Efficiency (issue 11, spec §11): the analytic table by hand, the two heads' logit shapes, the token
baseline's loss, the benchmarks' figures on a tiny grid, OOM ending a sweep, and the workflow target."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import yaml

from conftest import REPO, job_counts, snakemake
from bitstream import efficiency as eff
from bitstream import model as mdl
from bitstream.diffusion import edm_weight, token_ce_loss

TINY = {
    "threads": 1, "warmup": 1, "repeats": 2,
    "boundary": {"batch_size": 2, "seq_lens": [8], "vocab_sizes": [512], "embed_dims": [32]},
    "end_to_end": {"vocab_sizes": [256], "seq_len": 8, "batch_sizes": [2],
                   "architecture": {"embed_dim": 32, "n_blocks": 1, "n_heads": 2, "dim_ff": 64, "content_dim": 8,
                                    "head_hidden": 16, "dropout": 0.0, "self_condition": True}},
    "inference": {"nfe": 3, "micro_batches": [2]},
}


def test_analytic_table_by_hand():
    row = eff.analytic_table().set_index("setting").loc["LM1B"]   # (B, T, V, d) = (512, 128, 30522, 768)
    assert row["P"] == 15                                           # 2**14 < 30522 <= 2**15
    assert row["token_logits"] == 2_000_289_792                     # 512·128·30522
    assert row["bit_logits"] == 983_040                             # 512·128·15
    assert row["logit_ratio"] == pytest.approx(2034.8)              # 30522 / 15
    assert row["token_logits_bf16_gib"] == pytest.approx(3.72583, rel=1e-5)   # ·2 bytes / 2**30
    assert row["bit_logits_bf16_mib"] == pytest.approx(1.875)                 # ·2 bytes / 2**20
    assert row["token_out_params"] == 23_440_896                    # 768·30522
    assert row["bit_out_params"] == 2_211_840                       # 768·15·(64 + 128)
    owt = eff.analytic_table().set_index("setting").loc["OWT (B=128)"]
    assert owt["P"] == 16 and owt["logit_ratio"] == 4096


def test_head_logit_shapes():
    V, B, T = 1000, 2, 6
    P = eff.bits_for(V)
    assert P == 10
    arch = dict(embed_dim=32, n_blocks=1, n_heads=2, dim_ff=64, content_dim=8, head_hidden=16, dropout=0.0)
    bits = mdl.build_model(mdl.SDTConfig(**arch, patch_size=P, seq_len=T))
    x = torch.rand(B, T * P)
    assert bits.logits(x, torch.ones(B)).shape == (B, T * P)        # [B, T·⌈log2 V⌉]
    tok = mdl.build_model(mdl.SDTConfig(**arch, patch_size=P, seq_len=T, representation="tokens", vocab_size=V,
                                        logit_mode="none"))
    assert isinstance(tok, mdl.TokenSDT)
    assert tok.logits(torch.rand(B, T, V), torch.ones(B)).shape == (B, T, V)   # [B, T, V]
    with pytest.raises(ValueError, match="logit_mode 'none'"):
        mdl.SDTConfig(**arch, representation="tokens")


def test_token_ce_loss_closed_form():
    # uniform logits: CE = ln V at every position, so the loss is mean_b λ(σ_b)·ln V
    V, sigma = 50, torch.tensor([0.5, 2.0])
    loss = token_ce_loss(torch.zeros(2, 3, V), torch.randint(0, V, (2, 3)), sigma)
    assert loss.item() == pytest.approx(edm_weight(sigma).mean().item() * math.log(V), rel=1e-6)


def test_schema_defaults_match_module_defaults():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = schema["$defs"]["efficiency_settings"]["properties"]
    for key, value in eff.DEFAULTS.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                assert props[key]["properties"][sub]["default"] == v, (key, sub)
        else:
            assert props[key]["default"] == value, key


def test_out_of_memory_is_recorded_and_ends_the_sweep(monkeypatch):
    # the real thing, once: a 1 MiB budget cannot hold a training step
    settings = eff.with_defaults({**TINY, "memory_budget_mb": 1})      # the input layer alone is 8 MiB
    point = {"V": 65536, "L": 8, "architecture": TINY["end_to_end"]["architecture"], "model": "tokens", "B": 2}
    row = eff.run_point("end_to_end", point, settings)
    assert row["status"] == "oom" and "allocate" in row["error"]
    # the sweep logic: the first OOM ends that model's sweep, the other model's sweep goes on
    calls = []

    def fake(kind, point, settings, timeout=None):
        calls.append((kind, point.get("model"), point["B"]))
        oom = point.get("model") == "tokens" and point["B"] >= 4
        return {"kind": kind, "head": point.get("head"), "model": point.get("model"), "B": point["B"],
                "status": "oom" if oom else "ok", "ms": 1.0, "peak_mem_bytes": 1}

    monkeypatch.setattr(eff, "run_point", fake)
    eff.measure(eff.with_defaults({**TINY, "end_to_end": {**TINY["end_to_end"], "batch_sizes": [2, 4, 8]}}),
                progress=lambda s: None)
    e2e = [c for c in calls if c[0] == "end_to_end"]
    assert e2e == [("end_to_end", "bits", 2), ("end_to_end", "bits", 4), ("end_to_end", "bits", 8),
                   ("end_to_end", "tokens", 2), ("end_to_end", "tokens", 4)]


def test_paper_config_is_an_overlay_on_the_default(tmp_path):
    out = snakemake("-n", "-p", "--cores", "1", "efficiency", "--configfile",
                    str(REPO / "config" / "paper" / "efficiency.yaml"), cwd=tmp_path).stdout
    assert job_counts(out) == {"efficiency_benchmark": 1, "efficiency_report": 1, "efficiency": 1}
    assert '"device": "cuda"' in out and "128000" in out


@pytest.fixture(scope="module")
def efficiency_run(tmp_path_factory):
    """`snakemake efficiency` once, from an empty folder, on a tiny grid (one process per point)."""
    work = tmp_path_factory.mktemp("efficiency")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["efficiency"] = {**config["efficiency"], **TINY}
    cfg = work / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = snakemake("--cores", "1", "efficiency", "--configfile", str(cfg), cwd=work, timeout=600)
    return work, cfg, proc


def test_rule_runs_from_a_clean_results_folder(efficiency_run):
    work, cfg, proc = efficiency_run
    assert job_counts(proc.stdout + proc.stderr) == {"efficiency_benchmark": 1, "efficiency_report": 1, "efficiency": 1}
    res = work / "results"
    md = (res / "tables" / "efficiency.md").read_text()
    assert "Boundary" in md and "End to end" in md and "| LM1B |" in md
    assert (res / "tables" / "efficiency.tex").read_text().count(r"\begin{tabular}") == 4
    for name in eff.FIGURES:
        assert (res / "figures" / f"{name}.png").stat().st_size > 1000
    rerun = snakemake("-n", "--cores", "1", "efficiency", "--configfile", str(cfg), cwd=work).stdout
    assert "Nothing to be done" in rerun


def test_benchmarks_return_finite_positive_figures(efficiency_run):
    tables = eff.read_measurements(efficiency_run[0] / "results" / "efficiency")
    assert len(tables["analytic"]) == len(eff.ANALYTIC_SETTINGS)
    assert len(tables["boundary"]) == 2 and len(tables["end_to_end"]) == 2 and len(tables["inference"]) == 2
    for name, cols in (("boundary", ["ms", "peak_mem_bytes"]),
                       ("end_to_end", ["ms", "peak_mem_bytes", "tokens_per_s"]),
                       ("inference", ["ms", "peak_mem_bytes", "samples_per_s", "calls_per_s"])):
        df = tables[name]
        assert (df["status"] == "ok").all(), df
        for col in cols:
            assert df[col].map(math.isfinite).all() and (df[col] > 0).all(), (name, col, df[col].tolist())
    assert (tables["inference"]["nfe"] == 3).all()                 # a 3-point grid makes 3 calls
    b = eff.boundary_comparison(tables["boundary"])
    assert b.loc[0, "analytic_ratio"] == pytest.approx(512 / 9)
    assert (tables["boundary"]["code_version"] != "").all()


def test_token_baseline_trains_with_token_ce(tmp_path):
    """The token model trains through the ordinary stage: token CE selected in the config, loss falls,
    entropy tables written, the checkpoint reloads as a TokenSDT."""
    from test_train_loop import BITS, SEQ_LEN, TINY, make_cache

    from bitstream import checkpoint as ckpt
    from bitstream import train as tr

    cache = make_cache(tmp_path / "cache")
    p = yaml.safe_load(yaml.safe_dump(TINY))
    p["architecture"].update(representation="tokens", logit_mode="none")
    p["training"].update(loss="token_ce", steps=100, lr=3e-3, log_every=20, val_every=20)
    p["training"]["entropy"]["enabled"] = False
    tr.train(cache, BITS, SEQ_LEN, p, tmp_path / "out", device="cpu", quiet=True)
    val = pd.read_parquet(tmp_path / "out" / "train_log.parquet")["val_loss"].dropna().to_numpy()
    assert val[-1] < 0.9 * val[0], val            # fixed validation draw: comparable over steps
    for name in ("pdf", "cdf", "sigmas", "edges"):
        assert (tmp_path / "out" / "entropy" / f"entropy_{name}.pt").exists()
    model, meta = ckpt.load_model(tmp_path / "out" / "checkpoints" / "final.pt")
    assert isinstance(model, mdl.TokenSDT) and model.cfg.vocab == 2**BITS
    with pytest.raises(ValueError, match="token_ce goes with tokens"):
        p["training"]["loss"] = "binary_sm"
        tr.train(cache, BITS, SEQ_LEN, p, tmp_path / "bad", device="cpu", quiet=True)


def test_token_model_in_the_workflow(tmp_path, default_config):
    """A token baseline defined under models: trains by its path target; listing it in a run (which
    would sample it with the bit samplers) stops with the model named."""
    tok = yaml.safe_load(yaml.safe_dump(default_config["models"]["sdt_tiny"]))
    tok["architecture"].update(representation="tokens", logit_mode="none")
    tok["training"]["loss"] = "token_ce"
    default_config["models"]["tok_tiny"] = tok
    cfg = tmp_path / "tok.yaml"
    cfg.write_text(yaml.safe_dump(default_config, sort_keys=False))
    target = "results/lm1b_web/models/tok_tiny/checkpoints/final.pt"
    out = snakemake("-n", "-p", "--cores", "1", target, "--configfile", str(cfg), cwd=tmp_path).stdout
    assert job_counts(out).get("train") == 1 and '"loss": "token_ce"' in out
    default_config["runs"]["lm1b_web"]["models"].append("tok_tiny")
    cfg.write_text(yaml.safe_dump(default_config, sort_keys=False))
    proc = snakemake("-n", "--cores", "1", "all", "--configfile", str(cfg), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "'tok_tiny' is the token-space baseline" in proc.stdout + proc.stderr
