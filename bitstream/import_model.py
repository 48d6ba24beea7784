"""Stage ``import_model``: a released CoBit checkpoint (official format) -> this project's model files.

    python -m bitstream.import_model --params '<model config JSON>' --bits 15 --seq-len 128 \\
        --out-dir results/{run}/models/{model} [--run RUN --model MODEL]

The model's config section says ``source: import`` and, under ``import:``, where the weights and the
entropy tables are (``checkpoint:`` / ``entropy_tables:``, a local path or
``hub:<owner>/<repo>/<file>[@revision]``, see :mod:`bitstream.hub`) and ``format: official``. The job
writes what training writes, so every later stage is unchanged:

* ``checkpoints/final.pt`` -- our model file (``bitstream.checkpoint.MODEL_FORMAT``) with the EMA weights;
* ``entropy/entropy_{pdf,cdf,sigmas,edges}.pt`` -- the released tables, checked by ``EntropySchedule``;
* ``import.json`` -- provenance: source, revision, resolved commit, sha256, global step, EMA decay,
  layout, the self-conditioning convention.

Rules for the official files (reference/official_format/README.md §4; the layouts are made by the
official trainer and its ``make_release_checkpoint.py``):

1. A **release** file is ``{"model": EMA-baked state dict, "global_step", "epoch", "ema_decay", ...}``;
   a **training** file has ``model`` (live weights) plus ``ema = {"decay", "shadow"}``, and the shadow
   replaces every parameter it names (buffers stay). Evaluation always uses EMA weights, so a training
   file without a shadow is refused rather than silently evaluated with its live weights.
2. ``module.`` (DDP, leading) and ``_orig_mod.`` (``torch.compile``, anywhere) are dropped from names.
3. The file stores no architecture: heads, RoPE base, Fourier sizes, logit mode and clip come from the
   config. Every shape is checked against the model the config builds, and the load is strict (the
   official loader falls back to ``strict=False``, which hides a wrong config -- spec §14.11).
4. Self-conditioning: the released models were trained and sampled with **zeros** for "no estimate
   yet" (probability 0); this project's own convention is 0.5 (spec §7, §14.9). The imported model's
   architecture records ``sc_absent: 0.0``, so the SDT built from the file treats ``x0_hat = None``
   as zeros and every consumer (samplers, VLB) runs the weights on the distribution they were trained on.

Release files load with ``torch.load(weights_only=True)``. Training files carry numpy RNG state; they
are loaded with ``weights_only=True`` plus an allow-list of the four numpy reconstructors that state
needs -- never by executing arbitrary pickled code.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Mapping

import torch

from bitstream.hub import resolve_dir, resolve_file
from bitstream.io import atomic_path, parse_json_arg, provenance, sha256_file, write_json, stage_main

ENTROPY_FILES = tuple(f"entropy_{name}.pt" for name in ("pdf", "cdf", "sigmas", "edges"))
UPSTREAM_SC_ABSENT = 0.0     # upstream's "no estimate yet": a zeros tensor (probability 0)
IMPORT_DEFAULTS = {"format": "official", "entropy_tables": None}

# Where a wrong shape most likely comes from: (state-dict name pattern, config key per dimension).
_SHAPE_SUSPECTS = [
    (r"^cont_input_proj\.", ["architecture.content_dim", None]),
    (r"^patch_proj\.", ["architecture.embed_dim", "bits (patch size P) of the run, or architecture.content_dim"]),
    (r"^time_fn\._freq$", [None, "architecture.embed_dim"]),
    (r"^time_(proj|cond)\.", ["architecture.embed_dim", "architecture.embed_dim"]),
    (r"^blocks\.\d+\.ff\.W[ab]\.", ["architecture.dim_ff", "architecture.embed_dim"]),
    (r"^blocks\.\d+\.ff\.Wo\.", ["architecture.embed_dim", "architecture.dim_ff"]),
    (r"^blocks\.", ["architecture.embed_dim", "architecture.embed_dim"]),
    (r"^unpatch_proj_content\.", ["bits (patch size P) of the run, or architecture.content_dim",
                                  "architecture.embed_dim"]),
    (r"^head\.patch_adapter\.", ["architecture.head_hidden (or the run's bits)", "architecture.embed_dim"]),
    (r"^head\.input_adapter\.", ["architecture.head_hidden", "architecture.content_dim / self_condition"]),
    (r"^head\.time_proj\.", ["architecture.head_hidden", "architecture.embed_dim"]),
    (r"^head\.", ["architecture.head_hidden", "architecture.head_hidden"]),
]


class OfficialFormatError(ValueError):
    """A file that cannot be imported; the message names the file and the culprit."""


# ---------------------------------------------------------------------------------------------------
# Reading the official files


def _numpy_allow_list() -> list:
    """The numpy reconstructors a training file's ``rng_state`` needs (README §1(a))."""
    import numpy as np

    out = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2 cannot read these pickles anyway
        from numpy.core.multiarray import _reconstruct
    out.append(_reconstruct)
    out += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return out


def read_official(path: str | Path) -> dict:
    """``torch.load`` of an official file (release or training layout) without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001
        try:
            with torch.serialization.safe_globals(_numpy_allow_list()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- zip, pickle and type errors all mean "not ours to read"
            raise OfficialFormatError(f"{path}: not a readable checkpoint ({type(first).__name__}: "
                               f"{str(first).splitlines()[0] if str(first) else ''}); expected a torch.save file "
                               f"of an official CoBit release or training checkpoint") from err
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        keys = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
        raise OfficialFormatError(f"{path}: not an official CoBit checkpoint: expected a dict with a 'model' state "
                           f"dict, found {keys}")
    bad = [k for k, v in obj["model"].items() if not isinstance(v, torch.Tensor)]
    if bad or not obj["model"]:
        raise OfficialFormatError(f"{path}: 'model' is not a state dict of tensors (e.g. {bad[:3] or 'empty'})")
    return dict(obj)


def normalise_name(name: str) -> str:
    """Drop every ``_orig_mod.`` (torch.compile) and a leading ``module.`` (DDP), as upstream's loader."""
    name = name.replace("_orig_mod.", "")
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def ema_weights(ckpt: dict, path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA weights of an official file and how they were found (README §4 rules 2-3).

    Release layout: ``model`` is already EMA-baked. Training layout: ``model`` holds the live weights
    and ``ema.shadow`` replaces every parameter it names. A training file (optimizer / scheduler state)
    without a shadow is refused: its live weights are not what the paper evaluates.
    """
    model = {normalise_name(k): v for k, v in ckpt["model"].items()}
    ema = ckpt.get("ema")
    is_training = any(k in ckpt for k in ("opt", "optimizer", "lr_sched", "rng_state", "scaler")) or ema is not None
    if ema is None or not isinstance(ema, Mapping) or not isinstance(ema.get("shadow"), Mapping) or not ema["shadow"]:
        if is_training:
            what = "no 'ema' entry" if ema is None else "an 'ema' entry without a 'shadow' state dict"
            raise OfficialFormatError(f"{path}: a training checkpoint with {what}: its 'model' holds the live (non-EMA) "
                               f"weights, which are not the evaluated model. Import the release file "
                               f"(make_release_checkpoint.py output) or a training file saved with its EMA")
        return model, {"layout": "release", "ema_applied": False, "ema_decay": _float(ckpt.get("ema_decay"))}
    shadow = {normalise_name(k): v for k, v in ema["shadow"].items()}
    stray = sorted(set(shadow) - set(model))
    if stray:
        raise OfficialFormatError(f"{path}: ema.shadow names {len(stray)} tensor(s) absent from 'model' (e.g. {stray[:3]})")
    for k, v in shadow.items():
        if tuple(v.shape) != tuple(model[k].shape):
            raise OfficialFormatError(f"{path}: ema.shadow[{k!r}] has shape {tuple(v.shape)}, model has {tuple(model[k].shape)}")
        model[k] = v
    return model, {"layout": "training", "ema_applied": True, "ema_tensors": len(shadow),
                   "ema_decay": _float(ema.get("decay"))}


def _float(v):
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------
# Checking against the config's architecture


def _suspect(key: str, dim: int) -> str:
    for pattern, keys in _SHAPE_SUSPECTS:
        if re.search(pattern, key):
            k = keys[min(dim, len(keys) - 1)]
            return k or "the architecture section"
    return "the architecture section"


def check_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Every name and shape of the file against the model the config builds; the first mismatch is
    named with both shapes and the config key that is probably wrong."""
    own = model.state_dict()
    n_file = 1 + max([int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k))], default=-1)
    n_cfg = 1 + max([int(m.group(1)) for k in own if (m := re.match(r"blocks\.(\d+)\.", k))], default=-1)
    if n_file != n_cfg:
        raise OfficialFormatError(f"{path}: the file has {n_file} transformer blocks, the config builds {n_cfg}; "
                           f"check architecture.n_blocks")
    for key, mine in own.items():
        if key not in weights:
            continue
        theirs = weights[key]
        if tuple(theirs.shape) != tuple(mine.shape):
            dims = [i for i in range(max(theirs.ndim, mine.ndim))
                    if i >= theirs.ndim or i >= mine.ndim or theirs.shape[i] != mine.shape[i]]
            raise OfficialFormatError(f"{path}: shape mismatch at {key!r}: file {tuple(theirs.shape)}, config builds "
                               f"{tuple(mine.shape)}; check {_suspect(key, dims[0])}")
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        parts = ([f"missing from the file: {', '.join(missing[:5])}"] if missing else []) + \
                ([f"not in the model: {', '.join(unexpected[:5])}"] if unexpected else [])
        hint = ("architecture.self_condition" if any("input_adapter" in k or "cont_input" in k for k in missing + unexpected)
                else "the architecture section (or format: the file may not be an official SDT)")
        raise OfficialFormatError(f"{path}: weights do not fit the config's model ({'; '.join(parts)}); check {hint}")


def import_weights(path: str | Path, architecture: Mapping, bits: int, seq_len: int,
                   sigma_data: float = 0.5) -> tuple[torch.nn.Module, dict, dict]:
    """Official file -> (SDT holding the EMA weights, architecture as recorded, info). Strict."""
    from bitstream.checkpoint import build_model, load_state_dict_strict

    ckpt = read_official(path)
    weights, info = ema_weights(ckpt, path)
    arch = {**dict(architecture), "sc_absent": UPSTREAM_SC_ABSENT}
    model = build_model(arch, bits, seq_len, sigma_data)
    check_weights(model, weights, path)
    load_state_dict_strict(model, weights, str(path))
    model.eval()
    info.update(global_step=ckpt.get("global_step"), epoch=ckpt.get("epoch"),
                source_checkpoint=ckpt.get("source_checkpoint"), n_tensors=len(weights),
                n_params=sum(p.numel() for p in model.parameters()))
    return model, arch, info


# ---------------------------------------------------------------------------------------------------
# The stage


def run_import(params: Mapping, bits: int, seq_len: int, out_dir: str | Path, run: str | None = None,
               model_name: str | None = None) -> dict:
    """Write ``checkpoints/final.pt``, ``entropy/*`` and ``import.json`` under ``out_dir``; returns the record."""
    from bitstream.checkpoint import MODEL_FORMAT, save
    from bitstream.schedule import EntropySchedule

    if params.get("source", "train") != "import":
        raise ValueError(f"model {model_name or ''}: source is {params.get('source', 'train')!r}, not 'import'")
    imp = {**IMPORT_DEFAULTS, **(params.get("import") or {})}
    if imp["format"] != "official":
        raise ValueError(f"import.format: {imp['format']!r} is not supported (expected 'official')")
    if not imp.get("checkpoint"):
        raise ValueError("import.checkpoint: missing (a local path or hub:<owner>/<repo>/<file>[@revision])")
    if not imp.get("entropy_tables"):
        raise ValueError("import.entropy_tables: missing (a directory or hub: path holding "
                         f"{', '.join(ENTROPY_FILES)}); sampling on the entropic grid needs them")
    training = params.get("training") or {}
    sigma_data = float(training.get("sigma_data", 0.5))
    t0 = time.monotonic()
    ckpt_path, ckpt_prov = resolve_file(imp["checkpoint"], "checkpoint")
    digest = sha256_file(ckpt_path)
    model, arch, info = import_weights(ckpt_path, params.get("architecture") or {}, bits, seq_len, sigma_data)
    tables_dir, tables_prov = resolve_dir(imp["entropy_tables"], ENTROPY_FILES, "entropy tables")
    try:
        EntropySchedule.from_dir(tables_dir)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"import.entropy_tables {imp['entropy_tables']}: not valid entropy tables ({err})") from err
    seconds = time.monotonic() - t0

    out_dir = Path(out_dir)
    record = {
        "source": str(imp["checkpoint"]), "format": imp["format"], "layout": info["layout"],
        "revision": ckpt_prov.get("revision"), "commit": ckpt_prov.get("commit"),
        "resolved_path": str(ckpt_path), "sha256": digest, "bytes": ckpt_path.stat().st_size,
        "global_step": info.get("global_step"), "epoch": info.get("epoch"),
        "ema_decay": info.get("ema_decay"), "ema_applied": info["ema_applied"],
        "source_checkpoint": info.get("source_checkpoint"), "n_tensors": info["n_tensors"],
        "n_params": info["n_params"], "sc_absent": arch["sc_absent"],
        "entropy_tables": {"source": str(imp["entropy_tables"]), "revision": tables_prov.get("revision"),
                           "commit": tables_prov.get("commit"),
                           "sha256": {n: sha256_file(tables_dir / n) for n in ENTROPY_FILES}},
        "import_seconds": round(seconds, 3), "run": run, "model": model_name,
    }
    step = info.get("global_step")
    meta = {
        "architecture": arch, "training": dict(training), "bits": int(bits), "seq_len": int(seq_len),
        "step": int(step) if step is not None else None, "sigma_data": sigma_data, "n_params": info["n_params"],
        "source": "import", "import": record, **provenance(dict(params)),
    }
    # Tables first, checkpoint last: final.pt is what Snakemake looks at, and its presence means done.
    (out_dir / "entropy").mkdir(parents=True, exist_ok=True)
    for name in ENTROPY_FILES:
        with atomic_path(out_dir / "entropy" / name) as tmp:
            shutil.copyfile(tables_dir / name, tmp)
    write_json(out_dir / "import.json", record)
    save(out_dir / "checkpoints" / "final.pt", {"format": MODEL_FORMAT, "model": model.state_dict(), "meta": meta})
    return record


@stage_main("import_model")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.import_model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", required=True, help="the model's config section (JSON, @file.json)")
    ap.add_argument("--bits", type=int, required=True, help="bits per token (the run's 'bits' = patch size)")
    ap.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (the run's 'seq_len')")
    ap.add_argument("--out-dir", required=True, help="results/{run}/models/{model}")
    ap.add_argument("--run", default=None)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    try:
        record = run_import(parse_json_arg(args.params, "--params"), args.bits, args.seq_len, args.out_dir,
                            args.run, args.model)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"import_model: {err}")
    print(f"[import_model] {record['source']} ({record['layout']} layout, step {record['global_step']}, "
          f"EMA decay {record['ema_decay']}, sha256 {record['sha256'][:12]}…, {record['n_params']:,} parameters, "
          f"self-conditioning absent = {record['sc_absent']}) -> {args.out_dir} in {record['import_seconds']:.2f}s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
