"""Training config: the schema's defaults and ``fill_defaults`` (spec §13 hyper-parameters, §14.1).

The defaults repeat workflow/schemas/config.schema.yaml ($defs training / entropy / architecture /
resources). Snakemake fills them already; they are repeated here so the stage also runs from a
hand-written ``--params``, and a test checks that both agree.
"""

from __future__ import annotations

from typing import Any

ENTROPY_DEFAULTS: dict[str, Any] = {
    "enabled": True, "buffer_size": 800000, "num_bins": 128, "min_per_bin": 100, "update_every": 2000,
    "warmup_steps": 40000, "transition_steps": 10000, "gamma_max": 1.0, "target": "sqrt-rate",
    "reg_c": 0.1, "reg_n": 3.0, "floor": 0.0,
}
TRAINING_DEFAULTS: dict[str, Any] = {
    "steps": 1000000, "batch_size": 512, "lr": 3.0e-4, "min_lr": 1.0e-6, "warmup_steps": 2500,
    "weight_decay": 0.01, "betas": [0.9, 0.99], "eps": 1.0e-8, "grad_clip": 1.0, "ema_decay": 0.9999,
    "loss": "binary_sm", "weighting": "edm", "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0,
    "sigma_sampler": "log_normal", "p_mean": -1.2, "p_std": 1.2, "self_condition_prob": 0.5,
    "entropy": ENTROPY_DEFAULTS, "checkpoint_every": 5000, "keep_every": 50000, "log_every": 100,
    "val_every": 5000, "val_batches": 20, "seed": 42, "precision": "auto", "compile": False,
    "num_threads": 0, "stop_at_step": None,
}
ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "embed_dim": 768, "n_blocks": 12, "n_heads": 12, "dim_ff": 3072, "content_dim": 64, "head_hidden": 128,
    "dropout": 0.1, "rope_base": 10000.0, "self_condition": True, "logit_mode": "matched_filter_residual",
    "mf_clip": 30.0, "attention": "sdpa",
}
RESOURCES_DEFAULTS: dict[str, Any] = {
    "gpus": 0, "gpu_model": None, "cpus": 1, "mem_mb": 4000, "runtime": 60, "slurm_partition": None,
    "slurm_account": None, "slurm_extra": None,
}
SECTIONS = {"architecture": ARCHITECTURE_DEFAULTS, "training": TRAINING_DEFAULTS, "resources": RESOURCES_DEFAULTS}


def _fill(section: dict, defaults: dict, where: str) -> dict:
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(defaults)}")
    out = {}
    for key, default in defaults.items():
        value = section.get(key, default)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key}: expected a mapping, got {value!r}")
            value = _fill(value, default, f"{where}.{key}")
        out[key] = value
    return out


def fill_defaults(params: dict) -> dict:
    """``{architecture, training, resources}`` with every schema default filled in; unknown keys refused."""
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--params: unknown section(s) {', '.join(unknown)}; expected {', '.join(SECTIONS)}")
    cfg = {name: _fill(params.get(name) or {}, defaults, name) for name, defaults in SECTIONS.items()}
    t = cfg["training"]
    if t["sigma_data"] != 0.5:
        # §14.1: sampling and evaluation assume σ_d = 0.5 (diffusion.SIGMA_DATA); a different training
        # σ_d would silently train a model that every later stage evaluates with the wrong c_in.
        raise ValueError(f"training.sigma_data: only 0.5 is supported (spec §14.1), got {t['sigma_data']}")
    if not 0 < t["sigma_min"] < t["sigma_max"]:
        raise ValueError(f"training.sigma_min/sigma_max: need 0 < sigma_min < sigma_max, got "
                         f"{t['sigma_min']}, {t['sigma_max']}")
    return cfg
