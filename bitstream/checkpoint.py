"""Checkpoints: save, strict load, config checks, and ``load_model`` for the sampling / eval stages.

Two kinds of file are written by :mod:`bitstream.train` (spec §13, "Checkpoint contents"):

* a **training state** (``checkpoints/last.pt``, kept ``checkpoints/step=NNNNNNNNN.pt``): everything a
  resumed run needs to continue bit for bit — raw weights, EMA shadow, optimizer, lr scheduler, every
  RNG state, the data position, the entropy buffer and tables, the log so far, and the config it was
  trained with (the one list of fields: :class:`bitstream.train_state.TrainState`).
  ``format = TRAIN_STATE_FORMAT``.
* a **model file** (``checkpoints/final.pt``): the EMA weights "baked" into ``model`` plus a small
  ``meta`` (architecture, training, bits, seq_len, step, provenance), like the upstream release
  checkpoints. ``format = MODEL_FORMAT``.

Loading is strict (spec §14.11: upstream silently retried with ``strict=False``, so a checkpoint of a
different architecture could load nothing and still "work"). Parameter names are stored without the
``module.`` (DDP) / ``_orig_mod.`` (``torch.compile``) prefixes, and those prefixes are stripped on
load as well. A checkpoint whose config differs from the requested one is refused with a message
that names every mismatched key.

Files are loaded with ``torch.load(weights_only=True)``: they hold only tensors and plain Python
containers, so no pickled code is ever executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from bitstream.io import torch_save

TRAIN_STATE_FORMAT = "bitstream-train-state/1"
MODEL_FORMAT = "bitstream-model/1"

# Training keys that change how a run is observed or scheduled, never the weights it ends with; a
# resumed run may change them (e.g. validate more often, or use more threads).
RESUME_FREE_TRAINING_KEYS = ("stop_at_step", "checkpoint_every", "keep_every", "log_every", "val_every", "val_batches",
                             "num_threads", "compile")
_PREFIXES = ("module.", "_orig_mod.")


# ---------------------------------------------------------------------------------------------------
# State dicts


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip leading DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes, in any order."""
    out = {}
    for name, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if name.startswith(p):
                    name, changed = name[len(p):], True
        out[name] = value
    return out


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def load_state_dict_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that names missing, unexpected and
    wrongly shaped tensors (fix of spec §14.11: never fall back to a partial load)."""
    state = clean_state_dict(state)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
                    for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)}: {_short(shapes)}")
        raise ValueError(f"{where}: weights do not fit the model ({'; '.join(parts)}); "
                         f"the checkpoint was made with another architecture or code version")
    module.load_state_dict(state, strict=True)


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------------
# Configs


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"training": {"entropy": {"num_bins": 32}}}`` -> ``{"training.entropy.num_bins": 32}``."""
    if isinstance(cfg, Mapping):
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(cfg, tuple):
        cfg = list(cfg)
    return {prefix[:-1]: cfg}


def config_mismatches(saved: Mapping, requested: Mapping, ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ (or exist on one side only), rendered ``key (saved X, requested Y)``.

    ``ignore`` holds dotted keys (or dotted prefixes ending in ``.``) that may differ.
    """
    ignore = tuple(ignore)
    a, b = flatten(saved), flatten(requested)

    def ignored(key: str) -> bool:
        return any(key == i or (i.endswith(".") and key.startswith(i)) for i in ignore)

    out = []
    for key in sorted(set(a) | set(b)):
        if ignored(key):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            out.append(f"{key} (saved {va!r}, requested {vb!r})")
    return out


def resume_ignore() -> list[str]:
    """Keys a resumed run may change: the job's resources and the observation-only training keys."""
    return ["resources."] + [f"training.{k}" for k in RESUME_FREE_TRAINING_KEYS]


def check_config(saved: Mapping, requested: Mapping, path: str | os.PathLike, *, ignore: Iterable[str] = (),
                 hint: str = "") -> None:
    """Refuse a checkpoint trained with another config, naming every mismatched key."""
    bad = config_mismatches(saved, requested, ignore)
    if bad:
        raise ValueError(f"{path}: checkpoint was made with a different config: {'; '.join(bad)}"
                         + (f". {hint}" if hint else ""))


# ---------------------------------------------------------------------------------------------------
# Files


def save(path: str | os.PathLike, obj: dict) -> None:
    """Atomic ``torch.save``: a killed job never leaves a truncated checkpoint behind."""
    torch_save(path, obj)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- unpickling errors come in many types
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict) or "format" not in obj:
        raise ValueError(f"{path}: not a bitstream checkpoint (no 'format' key)")
    if obj["format"] not in (TRAIN_STATE_FORMAT, MODEL_FORMAT):
        raise ValueError(f"{path}: unknown checkpoint format {obj['format']!r} "
                         f"(expected {TRAIN_STATE_FORMAT!r} or {MODEL_FORMAT!r})")
    return obj


# ---------------------------------------------------------------------------------------------------
# Models


def sdt_config(architecture: Mapping, bits: int, seq_len: int, sigma_data: float = 0.5):
    """``SDTConfig`` from the config's ``architecture`` section plus the run's bits / seq_len (spec §6.1)."""
    from bitstream.model import SDTConfig

    return SDTConfig.from_params(dict(architecture), bits=int(bits), seq_len=int(seq_len), sigma_data=float(sigma_data))


def build_model(architecture: Mapping, bits: int, seq_len: int, sigma_data: float = 0.5) -> torch.nn.Module:
    from bitstream.model import SDT

    return SDT(sdt_config(architecture, bits, seq_len, sigma_data))


def model_meta(ckpt: dict) -> dict:
    """The ``meta`` of a model file, or the equivalent view of a training state."""
    if ckpt["format"] == MODEL_FORMAT:
        return dict(ckpt["meta"])
    cfg = ckpt["config"]
    return {"architecture": cfg["architecture"], "training": cfg["training"], "bits": cfg["bits"],
            "seq_len": cfg["seq_len"], "step": ckpt["step"], "source": "training-state (EMA weights)"}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               expect: Mapping | None = None) -> tuple[torch.nn.Module, dict]:
    """``(SDT in eval mode holding the EMA weights, meta)`` from ``final.pt`` (or a training state).

    ``meta`` has ``architecture``, ``training``, ``bits``, ``seq_len``, ``step`` (and, for ``final.pt``,
    provenance). ``expect`` (optional) maps meta keys — nested sections allowed, e.g.
    ``{"bits": 11, "seq_len": 32}`` — to required values; a mismatch is refused naming the keys.
    Weights are loaded strictly.
    """
    ckpt = load(path, map_location="cpu")
    meta = model_meta(ckpt)
    if expect:
        wanted = {k: meta.get(k, "<absent>") for k in expect}
        check_config(wanted, dict(expect), path)
    training = meta.get("training", {})
    model = build_model(meta["architecture"], meta["bits"], meta["seq_len"], training.get("sigma_data", 0.5))
    weights = ckpt["model"] if ckpt["format"] == MODEL_FORMAT else ckpt["ema"]["shadow"]
    load_state_dict_strict(model, weights, str(path))
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta
