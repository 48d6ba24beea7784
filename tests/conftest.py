"""Shared fixtures: the repository root, the default config, and a tiny config for end-to-end runs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SHARED_REFERENCE = REPO.parent / "shared" / "reference"

# Tests never reach a model hub: the loaders must work from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture
def default_config() -> dict:
    """A fresh copy per test: tests mutate it."""
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def tiny_config(base: dict | None = None) -> dict:
    """The default config shrunk to run end to end in about a minute on 2 cores."""
    cfg = copy.deepcopy(base or yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    cfg["seeds"] = [0, 1]
    for spec in cfg["sampler_specs"].values():
        spec["num_samples"] = 8
        spec["micro_batch"] = 4
    m = cfg["models"]["sdt_tiny"]
    m["architecture"].update(embed_dim=32, n_blocks=1, n_heads=2, dim_ff=64, content_dim=8, head_hidden=16)
    t = m["training"]
    t.update(steps=30, batch_size=8, warmup_steps=5, checkpoint_every=10, log_every=5, val_every=15, val_batches=1)
    t["entropy"].update(num_bins=8, min_per_bin=2, update_every=10, warmup_steps=10, transition_steps=10,
                        buffer_size=2000)
    for judge in cfg["judges"].values():
        judge.update(n_layer=1, n_embd=32, n_head=2, context=64, steps=10, batch_size=4)
    for rc in cfg["runs"].values():
        rc["corpus"]["max_documents"] = 300
        rc["specs"] = ["det_nfe16", "sto_nfe64_g010"]
        rc["evaluation"].update(real_samples=8, vlb_batches=1, vlb_batch_size=4)
        if rc["tokenizer"]["kind"] == "wordpiece":
            rc["tokenizer"]["vocab_size"] = 600
    cfg["runs"]["owt_web"]["code_tokenizer"]["vocab_size"] = 1200
    cfg["runs"]["owt_web"]["bits"] = 11
    cfg["sampler_specs"]["sto_nfe64_g010"]["nfe"] = 8
    return cfg


def checkout_env() -> dict[str, str]:
    """The environment for a subprocess that runs ``python -m bitstream.<stage>`` from another folder:
    it imports this checkout, not whatever checkout the editable install points at."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def snakemake(*args, cwd: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run the repository's workflow with ``--directory cwd`` so outputs never land in the repo."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(cwd), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=checkout_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def job_counts(log: str) -> dict[str, int]:
    """The 'Job stats' table of a snakemake log as {rule: count} (empty when nothing ran)."""
    if "Job stats:" not in log:
        return {}
    counts = {}
    for line in log.split("Job stats:")[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts
