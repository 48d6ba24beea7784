"""From a config ``sampler_spec`` to grid + knobs (spec §5.4, §5.5, §8.3; Appendix A.4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bitstream.samplers import SPEC_DEFAULTS, churn_gammas, plan_from_spec, spec_with_defaults

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO.parent / "shared" / "reference" / "entropy_tables"
needs_reference = pytest.mark.skipif(not (REFERENCE / "lm1b").is_dir(),
                                     reason=f"released entropy tables not found at {REFERENCE} (../shared/reference)")


def synthetic_tables(path: Path, num_bins: int = 16) -> Path:
    """Four tables in the released format (spec §5.3): log-uniform edges on [0.002, 80], a bump pdf."""
    edges = torch.logspace(torch.log10(torch.tensor(0.002)), torch.log10(torch.tensor(80.0)), num_bins + 1)
    sigmas = (edges[:-1] * edges[1:]).sqrt()
    pdf = torch.exp(-0.5 * (torch.log(sigmas) / 1.5) ** 2)
    pdf = pdf / pdf.sum()
    cdf = pdf.cumsum(0)
    cdf[-1] = 1.0
    path.mkdir(parents=True, exist_ok=True)
    for name, t in {"pdf": pdf, "cdf": cdf, "sigmas": sigmas, "edges": edges}.items():
        torch.save(t.float(), path / f"entropy_{name}.pt")
    return path


def test_spec_defaults_match_the_schema():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = schema["$defs"]["sampler_spec"]["properties"]
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    assert defaults == SPEC_DEFAULTS
    assert set(props) == set(SPEC_DEFAULTS) | {"sampler", "nfe", "paper"}
    assert set(props["sampler"]["enum"]) == {"ddim_entropic", "ddim_karras", "heun_entropic", "heun_karras"}


def test_bad_specs_name_the_key():
    with pytest.raises(ValueError, match="unknown key.*'gama'"):
        spec_with_defaults({"sampler": "ddim_karras", "nfe": 8, "gama": 0.1})
    with pytest.raises(ValueError, match="missing required key 'nfe'"):
        spec_with_defaults({"sampler": "ddim_karras"})
    with pytest.raises(ValueError, match="q_lo"):
        spec_with_defaults({"sampler": "ddim_karras", "nfe": 8, "q_lo": 0.9, "q_hi": 0.1})


def test_karras_plan_needs_no_tables_with_a_full_or_fixed_window():
    plan = plan_from_spec({"sampler": "ddim_karras", "nfe": 32, "gamma": 0.1, "window": "full"})
    assert plan.num_points == 32 and plan.nfe == 32
    assert float(plan.sigmas[0]) == pytest.approx(80.0) and float(plan.sigmas[-1]) == pytest.approx(0.08)
    assert (plan.window_lo, plan.window_hi) == (0.08, 80.0)
    fixed = plan_from_spec({"sampler": "heun_karras", "nfe": 31, "gamma": 0.1, "window": "fixed",
                            "s_tmin": 0.01, "s_tmax": 5.0})
    assert fixed.num_points == 16 and (fixed.window_lo, fixed.window_hi) == (0.08, 5.0)  # clamped
    det = plan_from_spec({"sampler": "ddim_karras", "nfe": 8})  # entropy_cdf window unused at γ = 0
    assert det.gamma == 0


def test_missing_tables_are_a_hard_error_naming_the_directory(tmp_path):
    empty = tmp_path / "entropy"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}.*entropy_pdf.pt"):
        plan_from_spec({"sampler": "ddim_entropic", "nfe": 16}, entropy_dir=empty)
    with pytest.raises(FileNotFoundError, match="no entropy directory"):
        plan_from_spec({"sampler": "heun_entropic", "nfe": 15})
    with pytest.raises(FileNotFoundError, match="entropy_cdf churn window"):
        plan_from_spec({"sampler": "ddim_karras", "nfe": 16, "gamma": 0.1}, entropy_dir=empty)


def test_entropic_plan_from_tables(tmp_path):
    tables = synthetic_tables(tmp_path / "entropy")
    plan = plan_from_spec({"sampler": "ddim_entropic", "nfe": 20, "gamma": 0.15, "q_lo": 0.1, "q_hi": 0.9},
                          entropy_dir=tables)
    top = float(torch.load(tables / "entropy_sigmas.pt")[-1])
    assert plan.num_points == 20 and float(plan.sigmas[-1]) == pytest.approx(0.08)
    assert float(plan.sigmas[0]) == pytest.approx(top, rel=1e-6)
    assert 0.08 < plan.window_lo < plan.window_hi < top
    refined = plan_from_spec({"sampler": "ddim_entropic", "nfe": 21, "sc_mode": "refined"}, entropy_dir=tables)
    assert refined.num_points == 11


@needs_reference
def test_released_lm1b_tables_full_band_window():
    plan = plan_from_spec({"sampler": "ddim_entropic", "nfe": 256, "gamma": 0.2, "q_lo": 0.0, "q_hi": 1.0},
                          entropy_dir=REFERENCE / "lm1b")
    assert plan.window_lo == pytest.approx(0.08) and plan.window_hi == pytest.approx(76.756, abs=1e-3)
    assert plan.num_points == 256 and plan.nfe == 256            # honest: 256 calls, not 255
    assert float(plan.sigmas[0]) == pytest.approx(76.756, abs=1e-3)
    assert float(plan.sigmas[-1]) == pytest.approx(0.08)
    gammas = churn_gammas(plan.sigmas, plan.gamma, (plan.window_lo, plan.window_hi))
    assert gammas == [0.2] * 255                                  # full band: every step, γ = target


@needs_reference
def test_released_owt_tables_leave_the_first_step_deterministic():
    plan = plan_from_spec({"sampler": "ddim_entropic", "nfe": 64, "gamma": 0.13}, entropy_dir=REFERENCE / "owt")
    assert plan.window_hi == pytest.approx(70.658, abs=1e-3)      # spec §8.3
    gammas = churn_gammas(plan.sigmas, plan.gamma, (plan.window_lo, plan.window_hi))
    assert gammas[0] == 0.0 and all(g == 0.13 for g in gammas[1:])


def test_read_spec_forms(tmp_path):
    from bitstream.sample import read_spec

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"sampler_specs": {"fast": {"sampler": "ddim_karras", "nfe": 8, "gamma": 0.1}}}))
    spec, name = read_spec(f"{cfg}:fast")
    assert name == "fast" and spec["gamma"] == 0.1 and spec["s_noise"] == 1.003 and spec["num_samples"] == 64
    with pytest.raises(ValueError, match="no sampler_specs.slow"):
        read_spec(f"{cfg}:slow")
    spec, name = read_spec(json.dumps({"sampler": "heun_karras", "nfe": 9}))
    assert name is None and spec["sc_mode"] == "carry"
    (tmp_path / "s.json").write_text(json.dumps({"sampler": "ddim_karras", "nfe": 4}))
    assert read_spec(f"@{tmp_path / 's.json'}")[0]["nfe"] == 4
