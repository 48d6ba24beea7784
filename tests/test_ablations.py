"""Issue 10: the paired bootstrap, the ablation table and figures from metric files, and the workflow
wiring of config/ablations.yaml (train job per variant, AR jobs, one-variant reruns)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bitstream.ablation_figures import build_figures
from bitstream.ablations import build_tables
from bitstream.bootstrap import SeedScores, bootstrap_difference, genppl_of
from conftest import REPO, job_counts, snakemake

ABLATIONS = REPO / "config" / "ablations.yaml"


def _seed(rng, n, nll_per_token, tokens=20, entropy=3.0, noise=None):
    toks = np.full(n, tokens, dtype=float)
    noise = rng.normal(0, 0.3, n) if noise is None else noise
    nll = (nll_per_token + noise) * toks
    ent = entropy + 0.1 * rng.normal(size=n)
    return SeedScores(nll, toks, ent)


# ---------------------------------------------------------------------------------------------------
# bootstrap


def test_identical_inputs_give_zero_width():
    rng = np.random.default_rng(0)
    seeds = [_seed(rng, 50, 4.0) for _ in range(3)]
    for stat in ("gen_ppl", "entropy"):
        iv = bootstrap_difference(seeds, seeds, stat, n_boot=300)
        assert iv.estimate == 0.0 and iv.lo == 0.0 and iv.hi == 0.0


def test_interval_covers_a_known_difference():
    """Variant = base with every text's NLL raised by a known shift on the same noise (common random
    numbers): the true GenPPL difference is known exactly; the paired interval covers it and is far
    narrower than the unpaired one."""
    rng = np.random.default_rng(1)
    base, variant = [], []
    shift = 0.05  # nats per token
    for _ in range(3):
        noise = rng.normal(0, 0.5, 200)
        b = _seed(rng, 200, 4.0, noise=noise)
        v = SeedScores(b.nll + shift * b.tokens + rng.normal(0, 0.2, 200), b.tokens, b.entropy + 0.2)
        base.append(b)
        variant.append(v)
    true = float(np.mean([math.exp((b.nll.sum() + shift * b.tokens.sum()) / b.tokens.sum()) for b in base])
                 - genppl_of(base)[0])
    paired = bootstrap_difference(variant, base, "gen_ppl", n_boot=2000, seed=3)
    unpaired = bootstrap_difference(variant, base, "gen_ppl", n_boot=2000, seed=3, paired=False)
    assert paired.covers(true), (paired, true)
    assert paired.lo > 0  # the shift is detected
    assert (paired.hi - paired.lo) < 0.5 * (unpaired.hi - unpaired.lo)
    ent = bootstrap_difference(variant, base, "entropy", n_boot=500)
    assert ent.covers(0.2) and ent.hi - ent.lo < 1e-9 + 1e-6


def test_paired_bootstrap_refuses_mismatched_samples():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="samples"):
        bootstrap_difference([_seed(rng, 10, 4.0)], [_seed(rng, 11, 4.0)], "gen_ppl")
    with pytest.raises(ValueError, match="statistic"):
        bootstrap_difference([_seed(rng, 10, 4.0)], [_seed(rng, 10, 4.0)], "bleu")


# ---------------------------------------------------------------------------------------------------
# table and figures from metric files


def _metric_file(path: Path, run, model, spec, seed, scores: SeedScores, sampler="ddim_entropic", nfe=16,
                 gamma=0.0, mauve=0.5):
    ppl = math.exp(np.nansum(scores.nll) / scores.tokens.sum())
    row = {"run": run, "model": model, "spec": spec, "seed": seed, "gen_ppl": ppl, "entropy": scores.entropy.mean(),
           "mauve": mauve, "sampler": sampler, "nfe": nfe, "gamma": gamma, "window": "entropy_cdf", "q_lo": 0.0,
           "q_hi": 1.0, "sample_nll": scores.nll.tolist(), "sample_tokens": scores.tokens.tolist(),
           "sample_entropy": scores.entropy.tolist()}
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row]).to_parquet(path)
    return path


def test_table_and_figures_from_metric_files(tmp_path):
    rng = np.random.default_rng(4)
    files = []
    specs = {"det16": ("ddim_entropic", 16, 0.0), "det32": ("ddim_entropic", 32, 0.0),
             "kar16": ("ddim_karras", 16, 0.0), "sto16": ("ddim_entropic", 16, 0.2)}
    for seed in range(3):
        noise = rng.normal(0, 0.4, 40)
        for model, level in (("base", 4.0), ("no_mf", 4.5)):
            for spec, (sampler, nfe, gamma) in specs.items():
                s = _seed(rng, 40, level + (0.3 if sampler == "ddim_karras" else 0.0), noise=noise)
                files.append(_metric_file(tmp_path / f"m/{model}/{spec}/seed{seed}.parquet", "r", model, spec, seed, s,
                                          sampler, nfe, gamma))
        files.append(_metric_file(tmp_path / f"m/ar/ancestral/seed{seed}.parquet", "r", "ar", "ancestral", seed,
                                  _seed(rng, 30, 3.5), "ar_ancestral", 32, float("nan")))
    real = _seed(rng, 40, 3.0)
    files.append(_metric_file(tmp_path / "m/real.parquet", "r", "real", "real", -1, real, None, None, None))
    cfg = {"base_model": "base", "base_spec": "det16", "spec_baselines": {"kar16": "det16"}, "bootstrap_samples": 300}
    rows = build_tables(files, cfg, tmp_path / "tables")
    for ext in ("md", "csv", "tex"):
        assert (tmp_path / "tables" / f"ablations.{ext}").stat().st_size > 0
    by = {(r["model"], r["spec"]): r for _, r in rows.iterrows() if r["role"] != "real data"}
    assert len(by) == 9 and (rows["role"] == "real data").sum() == 1
    assert by[("base", "det16")]["role"] == "base" and pd.isna(by[("base", "det16")]["d_gen_ppl"])
    no_mf = by[("no_mf", "det32")]
    assert no_mf["reference"] == "base / det32" and no_mf["paired"] and no_mf["d_gen_ppl_lo"] > 0
    assert by[("base", "kar16")]["reference"] == "base / det16" and by[("base", "kar16")]["d_gen_ppl_lo"] > 0
    ar = by[("ar", "ancestral")]
    assert ar["role"] == "AR reference" and not ar["paired"] and ar["d_gen_ppl_hi"] < 0
    assert "AR reference" in (tmp_path / "tables" / "ablations.md").read_text()
    paths = build_figures(files, cfg, tmp_path / "figures")
    assert [p.name for p in paths] == ["frontier_r.png", "nfe_r.png"]
    assert all(p.stat().st_size > 5000 for p in paths)


# ---------------------------------------------------------------------------------------------------
# workflow


@pytest.fixture(scope="module")
def ablation_dry_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("ablation_dag")
    return work, snakemake("-n", "--cores", "2", "all", "--configfile", str(ABLATIONS), cwd=work).stdout


def test_ablation_config_dry_run_lists_variants_and_ar_jobs(ablation_dry_run):
    import yaml

    _, out = ablation_dry_run
    cfg = yaml.safe_load(ABLATIONS.read_text())
    n_models = len(cfg["runs"]["lm1b_abl"]["models"])
    n_specs = len(cfg["runs"]["lm1b_abl"]["specs"])
    n_seeds = len(cfg["seeds"])
    assert n_models >= 5 and n_seeds >= 3
    jobs = job_counts(out)
    assert jobs["train"] == n_models
    assert jobs["ar_train"] == 1 and jobs["ar_sample"] == n_seeds
    assert jobs["sample"] == n_models * n_specs * n_seeds
    assert jobs["metrics"] == (n_models * n_specs + 1) * n_seeds
    assert jobs["ablation_tables"] == 1 and jobs["ablation_figures"] == 1
    for model in cfg["runs"]["lm1b_abl"]["models"]:
        assert f"models/{model}/checkpoints/final.pt" in out


def test_deleting_one_variant_metric_file_reruns_that_job_and_the_reports_only(ablation_dry_run):
    """A completed results tree is stood in for by empty files with one common mtime (every output of
    the dry run); after deleting one variant's metric file, asking for it and for `all` must bring back
    exactly its metrics job and what is built from metric files (summary, tables, figures)."""
    import os
    import re

    work, out = ablation_dry_run
    outputs = set()
    for line in out.splitlines():
        m = re.match(r"\s+output: (.*)", line)
        if m:
            outputs.update(p.strip() for p in m.group(1).split(","))
    stamp = 2_000_000_000  # one mtime for every output, later than the code files
    for rel in outputs:
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
        os.utime(p, (stamp, stamp))
    victim = "results/lm1b_abl/metrics/abl_no_mf/det_nfe64/seed1.parquet"
    assert victim in outputs
    (work / victim).unlink()
    proc = snakemake("-n", "--cores", "2", "all", victim, "--configfile", str(ABLATIONS), cwd=work)
    jobs = job_counts(proc.stdout)
    assert jobs == {"metrics": 1, "summary": 1, "tables": 1, "figures": 1, "ablation_tables": 1,
                    "ablation_figures": 1, "all": 1}, jobs


def test_paper_ablation_config_dry_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = REPO / "config" / "paper" / "lm1b_ablations.yaml"
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    out = snakemake("--profile", str(tmp_path / "slurm"), "-n", "all", "--configfile", str(cfg), cwd=tmp_path).stdout
    jobs = job_counts(out)
    assert jobs["train"] == 5 and jobs["ar_train"] == 1 and jobs["ablation_tables"] == 1

