"""The workflow as a user drives it: config validation, the DAG, an end-to-end run, no-op reruns,
one-seed reruns and figure-only rebuilds (issues 2, 4, 5)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, job_counts as _job_counts, snakemake, tiny_config

STAGES = ["corpus", "tokenizer", "token_cache", "base_cache", "code_tokenizer", "code_cache", "data_stats",
          "train", "sample", "judge", "metrics", "real_reference", "vlb", "summary", "tables", "figures"]


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_dry_run_lists_every_stage(tmp_path):
    out = snakemake("-n", "--cores", "2", "all", cwd=tmp_path).stdout
    counts = _job_counts(out)
    for stage in STAGES:
        assert counts.get(stage, 0) >= 1, f"stage {stage} missing from the DAG: {counts}"
    # 2 runs x 1 model x 3 specs x 3 seeds
    assert counts["sample"] == 18 and counts["metrics"] == 18


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda c: c["runs"]["lm1b_web"].__setitem__("tokenizr", {}), "tokenizr"),
        (lambda c: c["runs"]["lm1b_web"].__setitem__("bits", "eleven"), "eleven"),
        (lambda c: c["sampler_specs"]["det_nfe16"].__setitem__("sampler", "euler_magic"), "euler_magic"),
        (lambda c: c["runs"]["owt_web"].__setitem__("specs", ["no_such_spec"]), "no_such_spec"),
        (lambda c: c["models"]["sdt_tiny"]["training"].__setitem__("lr", -1.0), "lr"),
        (lambda c: c["runs"]["lm1b_web"]["tokenizer"].__setitem__("workers", 4), "tokenizer.workers"),
    ],
    ids=["unknown-key", "wrong-type", "bad-enum", "undefined-spec", "negative-lr", "workers-over-cpus"],
)
def test_bad_config_stops_with_the_key_named(tmp_path, default_config, mutate, needle):
    mutate(default_config)
    cfg = _write(tmp_path / "bad.yaml", default_config)
    proc = snakemake("-n", "--cores", "1", "all", "--configfile", str(cfg), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr


def test_configfile_replaces_the_default(tmp_path, default_config):
    del default_config["runs"]["owt_web"]
    cfg = _write(tmp_path / "one_run.yaml", default_config)
    out = snakemake("-n", "--cores", "1", "all", "--configfile", str(cfg), cwd=tmp_path).stdout
    assert "owt_web" not in out and "lm1b_web" in out


def test_command_line_override(tmp_path):
    out = snakemake("-n", "--cores", "1", "all", "--config", "seeds=[7]", cwd=tmp_path).stdout
    assert "seed7.parquet" in out and "seed0.parquet" not in out


# ---------------------------------------------------------------------------------------------
# One end-to-end run of the whole pipeline on a tiny config, shared by the tests below.


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    cfg = _write(work / "tiny.yaml", tiny_config())
    t0 = time.monotonic()
    snakemake("--cores", "2", "all", "--configfile", str(cfg), cwd=work, timeout=1200)
    print(f"end-to-end tiny run: {time.monotonic() - t0:.1f} s")
    return work, cfg


@pytest.mark.slow
def test_end_to_end_outputs(e2e):
    work, _ = e2e
    res = work / "results"
    for run in ("lm1b_web", "owt_web"):
        summary = pd.read_parquet(res / run / "summary.parquet")
        assert len(summary) > 0
        for seed in (0, 1):
            m = pd.read_parquet(res / run / "metrics" / "sdt_tiny" / "det_nfe16" / f"seed{seed}.parquet")
            for col in ("gen_ppl", "entropy", "nfe", "gamma", "code_version", "config_hash", "seed"):
                assert col in m.columns, f"{col} missing in metrics of {run}"
        assert (res / run / "metrics" / "data_stats.parquet").exists()
        for t in ("pdf", "cdf", "sigmas", "edges"):
            assert (res / run / "models" / "sdt_tiny" / "entropy" / f"entropy_{t}.pt").exists()
    for ext in ("md", "csv", "tex"):
        assert (res / "tables" / f"table1.{ext}").stat().st_size > 0
    for png in (res / "figures").glob("*.png"):
        assert png.stat().st_size > 1000


@pytest.mark.slow
def test_rerun_is_a_no_op(e2e):
    work, cfg = e2e
    out = snakemake("-n", "--cores", "2", "all", "--configfile", str(cfg), cwd=work).stdout
    assert "Nothing to be done" in out, out[-3000:]


@pytest.mark.slow
def test_deleting_one_seed_reruns_that_seed_only(e2e):
    work, cfg = e2e
    target = work / "results" / "lm1b_web" / "samples" / "sdt_tiny" / "sto_nfe64_g010" / "seed1.parquet"
    before = pd.read_parquet(target)
    target.unlink()
    proc = snakemake("--cores", "2", str(target.relative_to(work)), "--configfile", str(cfg), cwd=work)
    jobs = _job_counts(proc.stdout + proc.stderr)
    assert jobs == {"sample": 1}, jobs
    after = pd.read_parquet(target)
    # the seed alone decides the samples
    assert before["text"].tolist() == after["text"].tolist()
    assert before["model_ids"].map(list).tolist() == after["model_ids"].map(list).tolist()


@pytest.mark.slow
def test_editing_plot_code_redraws_figures_only(e2e):
    work, cfg = e2e
    snakemake("--cores", "2", "all", "--configfile", str(cfg), cwd=work)
    figures_py = REPO / "bitstream" / "figures.py"
    original = figures_py.read_bytes()
    try:  # a real edit: Snakemake 9 ignores a newer mtime when the content is unchanged
        figures_py.write_bytes(original + b"\n# an edit to the plotting code\n")
        out = snakemake("-n", "--cores", "2", "all", "--configfile", str(cfg), cwd=work).stdout
    finally:
        figures_py.write_bytes(original)
    jobs = _job_counts(out)
    assert "figures" in jobs and set(jobs) <= {"figures", "all"}, out[-3000:]


@pytest.mark.slow
def test_a_deleted_entropy_table_is_noticed(e2e):
    """Issue 13: entropy tables are declared inputs of their consumers, so deleting one makes
    `snakemake all` redo the training job that writes it (and what reads it), not "Nothing to be done"."""
    work, cfg = e2e
    table = work / "results" / "lm1b_web" / "models" / "sdt_tiny" / "entropy" / "entropy_cdf.pt"
    saved, st = table.read_bytes(), table.stat()
    table.unlink()
    try:
        out = snakemake("-n", "--cores", "2", "all", "--configfile", str(cfg), cwd=work).stdout
    finally:
        table.write_bytes(saved)
        os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns))  # as it was: later tests see no change
    jobs = _job_counts(out)
    assert jobs.get("train") == 1 and "sample" in jobs and "figures" in jobs, out[-3000:]


def _dry_run_jobs(out: str) -> list[dict]:
    """Jobs of a ``snakemake -n -p`` log: rule, declared threads, resources line and shell command."""
    jobs, job = [], None
    for line in out.splitlines():
        s = line.strip()
        if s.startswith(("rule ", "localrule ")) and s.endswith(":"):
            job = {"rule": s.split()[1].rstrip(":"), "threads": 1, "resources": "", "shell": ""}
            jobs.append(job)
        elif job is not None and s.startswith("threads:"):
            job["threads"] = int(s.split()[1])
        elif job is not None and s.startswith("resources:"):
            job["resources"] = s
        elif job is not None and s.startswith("Shell command:"):
            job["shell"] = s
    return jobs


def test_declared_threads_equal_the_threads_each_job_uses(tmp_path, default_config):
    """snakemake --cores N never runs more compute threads than N: each job's declared threads are
    the cpus of its config block, what it passes to --threads (torch intra-op threads, bitstream.cpu),
    and its SLURM --cpus-per-task."""
    import re

    cfg = default_config
    cfg["models"]["sdt_tiny"]["resources"]["cpus"] = 3
    for name, spec in cfg["sampler_specs"].items():
        spec.setdefault("resources", {})["cpus"] = 2
    judge = cfg["runs"]["lm1b_web"]["judge"]
    cfg["judges"][judge].setdefault("resources", {})["cpus"] = 2
    for rc in cfg["runs"].values():
        rc["evaluation"].setdefault("resources", {})["cpus"] = 2
        rc.setdefault("data_resources", {})["cpus"] = 2
    path = _write(tmp_path / "threads.yaml", cfg)
    expect = {"train": 3, "sample": 2, "judge": 2, "metrics": 2, "real_reference": 2, "vlb": 2,
              "corpus": 2, "tokenizer": 2, "token_cache": 2, "base_cache": 2, "code_tokenizer": 2,
              "code_cache": 2, "data_stats": 2, "summary": 1, "tables": 1, "figures": 1}
    out = snakemake("-n", "-p", "--cores", "4", "all", "--configfile", str(path), cwd=tmp_path).stdout
    jobs = [j for j in _dry_run_jobs(out) if j["rule"] != "all"]
    assert {j["rule"] for j in jobs} == set(expect), {j["rule"] for j in jobs}
    torch_stages = {"train", "sample", "judge", "metrics", "real_reference", "vlb"}
    for job in jobs:
        assert job["threads"] == expect[job["rule"]], job
        if job["rule"] in torch_stages:
            assert re.findall(r"--threads (\d+)", job["shell"]) == [str(job["threads"])], job
        if job["threads"] > 1 or job["rule"] in torch_stages:
            assert f"cpus_per_task={job['threads']}" in job["resources"], job
    # --cores caps a job's threads (and with it the --threads it passes) at N
    out = snakemake("-n", "-p", "--cores", "2", "all", "--configfile", str(path), cwd=tmp_path).stdout
    train = next(j for j in _dry_run_jobs(out) if j["rule"] == "train")
    assert train["threads"] == 2 and "--threads 2" in train["shell"]


def test_ar_reference_jobs_declare_the_threads_they_use(tmp_path):
    """The AR reference's training and sampling (config/ablations.yaml) follow the same accounting."""
    import re

    cfg = yaml.safe_load((REPO / "config" / "ablations.yaml").read_text())
    cfg["ar_models"]["ar_ref"]["resources"]["cpus"] = 2
    path = _write(tmp_path / "abl.yaml", cfg)
    out = snakemake("-n", "-p", "--cores", "4", "all", "--configfile", str(path), cwd=tmp_path).stdout
    ar_jobs = [j for j in _dry_run_jobs(out) if j["rule"] in ("ar_train", "ar_sample")]
    assert {j["rule"] for j in ar_jobs} == {"ar_train", "ar_sample"}
    for job in ar_jobs:
        assert job["threads"] == 2 and re.findall(r"--threads (\d+)", job["shell"]) == ["2"], job
        assert "cpus_per_task=2" in job["resources"], job
