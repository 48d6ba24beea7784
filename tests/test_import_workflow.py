"""Issue 9: a model imported from released (official-format) weights runs through the workflow with
an ``import_model`` job instead of ``train``: import -> sample -> metrics -> tables, no training."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, SHARED_REFERENCE, job_counts, snakemake, tiny_config

OFFICIAL = SHARED_REFERENCE / "official_format"
TABLES = SHARED_REFERENCE / "entropy_tables" / "lm1b"
needs_fixtures = pytest.mark.skipif(not (OFFICIAL / "tiny_sdt").is_dir() or not TABLES.is_dir(),
                                    reason=f"official-format fixtures not found under {SHARED_REFERENCE}")

# The fixture's official tiny SDT (architecture.json): P = 11 bits, L = 16 tokens.
TINY_ARCH = dict(embed_dim=12, n_blocks=2, n_heads=2, dim_ff=36, content_dim=4, head_hidden=10)


def imported_config() -> dict:
    """The tiny LM1B-style run with its model imported from the fixture's release file."""
    cfg = tiny_config()
    del cfg["runs"]["owt_web"]
    cfg["seeds"] = [0]
    cfg["models"] = {"released_tiny": {
        "source": "import",
        "import": {"checkpoint": str(OFFICIAL / "tiny_sdt" / "release_checkpoint.pt"),
                   "entropy_tables": str(TABLES), "format": "official"},
        "architecture": dict(TINY_ARCH),
    }}
    spec = cfg["sampler_specs"]["det_nfe16"]
    spec.update(nfe=4, num_samples=4, micro_batch=4)
    cfg["sampler_specs"] = {"det_nfe4": spec}
    rc = cfg["runs"]["lm1b_web"]
    rc.update(models=["released_tiny"], specs=["det_nfe4"], seq_len=16, bits=11)
    rc["evaluation"].update(vlb=True, vlb_batches=1, vlb_batch_size=2, real_samples=4)
    return cfg


@pytest.fixture(autouse=True)
def _this_checkout(monkeypatch):
    """Jobs run ``python -m bitstream.<stage>`` in the test's directory: import this checkout's package."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))


def _write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@needs_fixtures
def test_import_without_checkpoint_is_a_config_error(tmp_path):
    cfg = imported_config()
    del cfg["models"]["released_tiny"]["import"]
    proc = snakemake("-n", "--cores", "1", "all", "--configfile", str(_write(tmp_path / "bad.yaml", cfg)),
                     cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "import" in proc.stdout + proc.stderr


@needs_fixtures
@pytest.mark.slow
def test_import_sample_metrics_tables_end_to_end(tmp_path):
    cfg = _write(tmp_path / "imported.yaml", imported_config())
    proc = snakemake("--cores", "2", "tables", "--configfile", str(cfg), cwd=tmp_path)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts.get("import_model") == 1 and "train" not in counts, counts
    model_dir = tmp_path / "results" / "lm1b_web" / "models" / "released_tiny"
    record = json.loads((model_dir / "import.json").read_text())
    assert record["layout"] == "release" and record["global_step"] == 3 and record["sc_absent"] == 0.0
    assert len(record["sha256"]) == 64 and record["ema_decay"] == pytest.approx(0.9)
    assert not (model_dir / "train_log.parquet").exists()
    samples = pd.read_parquet(tmp_path / "results/lm1b_web/samples/released_tiny/det_nfe4/seed0.parquet")
    assert len(samples) == 4 and (samples["nfe"] == 4).all() and (samples["checkpoint_step"] == 3).all()
    assert (samples["sc_absent"] == 0.0).all() and (samples["model_source"] == "import").all()
    metrics = pd.read_parquet(tmp_path / "results/lm1b_web/metrics/released_tiny/det_nfe4/seed0.parquet")
    assert len(metrics) >= 1
    table = (tmp_path / "results" / "tables" / "table1.md").read_text()
    assert "released_tiny" in table
    # a second run is a no-op
    again = snakemake("--cores", "2", "tables", "--configfile", str(cfg), cwd=tmp_path)
    assert job_counts(again.stdout + again.stderr) == {}


@pytest.mark.parametrize("name", ["released_lm1b_cobit_s", "released_owt_cobit_s", "released_owt_cobit_m"])
def test_released_paper_configs_import_and_never_train(tmp_path, name):
    """Each released config goes from nothing to Table 1 with an import_model job and no train job, and
    pairs every honest spec with upstream's operating point (N-1 calls, gamma·(N-1)/(N-2))."""
    path = REPO / "config" / "paper" / f"{name}.yaml"
    proc = snakemake("-n", "--cores", "1", "all", "--configfile", str(path), cwd=tmp_path)
    counts = job_counts(proc.stdout)
    assert counts.get("import_model") == 1 and "train" not in counts, counts
    assert counts["tables"] == 1 and counts["sample"] == counts["metrics"] > 0
    cfg = yaml.safe_load(path.read_text())
    (model,) = cfg["models"].values()
    assert model["source"] == "import" and model["import"]["checkpoint"].startswith("hub:gbatzolis/CoBit/")
    specs = cfg["sampler_specs"]
    for spec_name, spec in specs.items():
        if "_up" not in spec_name:
            continue
        n = spec["nfe"] + 1
        honest = specs[spec_name.replace(f"_up{n}", f"_nfe{n}")]
        assert honest["nfe"] == n and spec["gamma"] == pytest.approx(honest["gamma"] * (n - 1) / (n - 2))
        assert spec.get("paper") == honest.get("paper")
