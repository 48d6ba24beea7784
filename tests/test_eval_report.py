"""Summary (mean ± std over seeds), Table 1 and the figures, built from fixture parquet files alone."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from bitstream import figures, summary, tables

PPL = {"det": [10.0, 12.0, 17.0], "sto_g010": [20.0, 21.0, 25.0], "sto_g020": [30.0, 31.0, 32.0]}
GAMMA = {"det": 0.0, "sto_g010": 0.1, "sto_g020": 0.2}


def metric_row(run, spec, seed, ppl, **extra):
    return {"run": run, "model": "sdt_tiny", "spec": spec, "seed": seed, "gen_ppl": ppl,
            "gen_nll": math.log(ppl), "gen_bpt": math.log2(ppl), "entropy": 4.0 + 0.1 * seed + GAMMA[spec],
            "mauve": float("nan"), "mauve_skipped_reason": "disabled", "invalid_code_rate": 0.01 * seed,
            "samples_per_s": 100.0 / (1 + GAMMA[spec]) + seed, "n_samples": 64, "sampler": "ddim_entropic",
            "nfe": 16 if spec == "det" else 64, "gamma": GAMMA[spec], "s_noise": 1.003, "sc_mode": "carry",
            "terminal_sigma": 0.08, "device": "cpu", "judge_name": "gpt2_small_local", "judge_dtype": "float32",
            "judge_context": 128, "code_version": f"c{seed % 2}", "config_hash": "h", "gen_code_version": "g",
            "gen_config_hash": "gh", **extra}


def make_run(root, run):
    """A run directory as the pipeline leaves it, minus the models' weights."""
    d = root / run
    for spec, ppls in PPL.items():
        for seed, ppl in enumerate(ppls):
            p = d / "metrics" / "sdt_tiny" / spec / f"seed{seed}.parquet"
            p.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame([metric_row(run, spec, seed, ppl)]).to_parquet(p)
    real = metric_row(run, "det", 0, 8.0, n_samples=64)
    real.update(model="real", spec="real", seed=-1, entropy=4.5)
    pd.DataFrame([real]).to_parquet(d / "metrics" / "real.parquet")
    pd.DataFrame([{"run": run, "model": "sdt_tiny", "vlb_bpb": 0.42, "recon_bpb": 0.01, "diff_bpb": 0.41,
                   "prior_bpb": 5e-5, "n_rows": 128, "seed": 0, "code_version": "c0", "config_hash": "v"}]
                 ).to_parquet(d / "metrics" / "sdt_tiny" / "vlb.parquet")
    return d


def add_model_files(d):
    m = d / "models" / "sdt_tiny"
    (m / "entropy").mkdir(parents=True)
    edges = torch.logspace(math.log10(0.002), math.log10(80.0), 33)
    sigmas = (edges[:-1] * edges[1:]).sqrt()
    pdf = torch.exp(-0.5 * ((sigmas.log() - math.log(0.7)) / 1.0) ** 2) * (sigmas > 0.1)
    pdf = pdf / pdf.sum()
    cdf = pdf.cumsum(0)
    cdf[-1] = 1.0
    for name, t in (("pdf", pdf), ("cdf", cdf), ("sigmas", sigmas), ("edges", edges)):
        torch.save(t.float(), m / "entropy" / f"entropy_{name}.pt")
    steps = np.arange(0, 1501, 25)
    log = pd.DataFrame({"step": steps, "loss": 2.0 / np.sqrt(1 + steps / 100),
                        "val_loss": np.where(steps % 250 == 0, 2.2 / np.sqrt(1 + steps / 100), np.nan),
                        "entropy_gamma": np.clip((steps - 600) / 300, 0, 1)})
    log.to_parquet(m / "train_log.parquet")


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "results", "lm1b_web")


def test_summary_three_seeds(run_dir, tmp_path):
    out = run_dir / "summary.parquet"
    summary.main(["--run-dir", str(run_dir), "--out", str(out)])
    s = pd.read_parquet(out)
    assert list(s["kind"]) == ["real", "spec", "spec", "spec", "vlb"]
    det = s[(s["kind"] == "spec") & (s["spec"] == "det")].iloc[0]
    assert det["n_seeds"] == 3 and det["seeds"] == "0,1,2"
    assert det["gen_ppl_mean"] == pytest.approx(13.0)
    assert det["gen_ppl_std"] == pytest.approx(math.sqrt(13.0))  # (9 + 1 + 16) / (3 − 1)
    assert det["entropy_mean"] == pytest.approx(4.1) and det["entropy_std"] == pytest.approx(0.1)
    assert math.isnan(det["mauve_mean"])
    assert det["nfe"] == 16 and det["gamma"] == 0.0 and det["judge_name"] == "gpt2_small_local"
    assert det["code_version"] == "c0,c1" and det["gen_config_hash"] == "gh"
    real = s[s["kind"] == "real"].iloc[0]
    assert real["gen_ppl_mean"] == 8.0 and real["n_seeds"] == 1 and math.isnan(real["gen_ppl_std"])
    assert s[s["kind"] == "vlb"].iloc[0]["vlb_bpb"] == 0.42

    # explicit inputs (the rule's) leave out a stale spec directory
    only = [run_dir / "metrics" / "sdt_tiny" / "det" / f"seed{i}.parquet" for i in range(3)]
    summary.main(["--run-dir", str(run_dir), "--out", str(tmp_path / "s2.parquet"),
                  "--inputs", *map(str, only), str(run_dir / "metrics" / "real.parquet")])
    assert list(pd.read_parquet(tmp_path / "s2.parquet")["kind"]) == ["real", "spec"]


def test_summary_refuses_duplicate_seeds(run_dir):
    frame = pd.DataFrame([metric_row("r", "det", 0, 10.0), metric_row("r", "det", 0, 11.0)])
    with pytest.raises(ValueError, match="duplicate"):
        summary.aggregate_seeds(frame)


def test_table1_from_summaries(tmp_path):
    root = tmp_path / "results"
    paths = []
    for run in ("lm1b_web", "owt_web"):
        d = make_run(root, run)
        summary.main(["--run-dir", str(d), "--out", str(d / "summary.parquet")])
        paths.append(str(d / "summary.parquet"))
    paper = {"lm1b_web": {"real": {"gen_ppl": 53.06, "entropy": 4.31},
                          "specs": {"sto_g020": {"gen_ppl": 59.76, "gen_ppl_std": 0.57, "entropy": 4.31}}},
             "owt_web": {"real": None, "specs": {}}}
    out = tmp_path / "tables"
    tables.main(["--summaries", *paths, "--paper", json.dumps(paper), "--out-dir", str(out)])
    md, tex = (out / "table1.md").read_text(), (out / "table1.tex").read_text()
    csv = pd.read_csv(out / "table1.csv")
    assert "13.00 ± 3.61" in md and "59.76 ± 0.57" in md and "53.06" in md and "Paper GenPPL" in md
    assert r"13.00 $\pm$ 3.61" in tex and r"\toprule" in tex and "lm1b\\_web" in tex
    # per run: real, deterministic, then stochastic by γ
    lm = csv[csv["run"] == "lm1b_web"]
    assert list(lm["row"]) == ["real data", "deterministic", "stochastic", "stochastic"]
    assert list(lm["gamma"].fillna(-1)) == [-1, 0.0, 0.1, 0.2]
    assert lm.iloc[0]["gen_ppl_mean"] == 8.0 and lm.iloc[3]["paper_gen_ppl"] == 59.76
    assert lm.iloc[1]["vlb_bpb"] == 0.42 and len(csv) == 8

    # without published numbers the paper columns are left out
    tables.main(["--summaries", paths[0], "--out-dir", str(tmp_path / "t2")])
    assert "Paper" not in (tmp_path / "t2" / "table1.md").read_text()


def test_figures_from_files(tmp_path):
    root = tmp_path / "results"
    d = make_run(root, "lm1b_web")
    summary.main(["--run-dir", str(d), "--out", str(d / "summary.parquet")])
    add_model_files(d)
    bare = root / "owt_web"  # a run with nothing computed yet still gets (annotated) panels
    bare.mkdir()
    paths = figures.build_figures([d, bare], tmp_path / "figures")
    assert {p.name for p in paths} == {f"{n}.png" for n in figures.FIGURES}
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_fallback_sigma_grid_is_descending_within_bounds(tmp_path):
    d = make_run(tmp_path, "r")
    add_model_files(d)
    edir = d / "models" / "sdt_tiny" / "entropy"
    grid = figures.sigma_grid(edir, figures.load_entropy_tables(edir), 16, 0.08)
    assert len(grid) == 16 and np.all(np.diff(grid) < 0)
    assert grid[-1] == pytest.approx(0.08, rel=1e-4) and grid[0] <= 80.0
