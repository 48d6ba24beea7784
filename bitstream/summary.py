"""Per-run summary: mean ± std over seeds per (run, model, spec), the real-data row and the VLB.

Reads ``results/{run}/metrics/{model}/{spec}/seed*.parquet`` (one row per seed, ``bitstream.metrics``),
``metrics/real.parquet`` and ``metrics/{model}/vlb.parquet`` and writes ``results/{run}/summary.parquet``,
one row per

* ``kind = "spec"``: (run, model, spec) — ``{metric}_mean``, ``{metric}_std`` (sample std, ddof = 1;
  NaN for a single seed) and ``n_seeds`` for GenPPL, NLL, entropy, MAUVE, invalid-code rate and
  samples/s (the paper reports mean ± std over seeds 42..51, spec §9.1), plus the sampler settings,
  judge and provenance (every distinct code version / config hash that went into the row);
* ``kind = "real"``: the real-data reference (same columns; one "seed");
* ``kind = "vlb"``: one per model, VLB in bits per bit with its terms.

Tables and figures are built from this file alone.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bitstream.io import stage_main, write_parquet

AGGREGATED = ("gen_ppl", "gen_nll", "gen_bpt", "entropy", "mauve", "invalid_code_rate", "samples_per_s")
# Settings that describe a spec (identical over its seeds); carried as-is, or joined if they differ.
SETTINGS = ("sampler", "method", "grid", "grid_points", "nfe", "network_calls", "gamma", "s_noise", "window",
            "window_lo", "window_hi", "q_lo", "q_hi", "s_tmin", "s_tmax", "sc_mode", "eta", "terminal_sigma",
            "threshold", "num_samples", "micro_batch", "n_samples", "device", "precision", "checkpoint_step",
            "judge_name", "judge_kind", "judge_dtype", "judge_context")
PROVENANCE = ("code_version", "config_hash", "gen_code_version", "gen_config_hash")
KEYS = ["run", "model", "spec"]


def _join_unique(values) -> str:
    return ",".join(sorted({str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))}))


def _setting(values):
    """The one value of a setting over seeds, or the distinct values joined when they differ."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    first = vals[0]
    if all(v == first for v in vals):
        return first.item() if hasattr(first, "item") else first
    return _join_unique(vals)


def aggregate_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, model, spec) with mean, sample std (ddof = 1) and n_seeds of each metric."""
    missing = [k for k in (*KEYS, "seed") if k not in per_seed.columns]
    if missing:
        raise ValueError(f"metrics rows lack columns {missing}")
    dup = per_seed.duplicated([*KEYS, "seed"])
    if dup.any():
        raise ValueError(f"duplicate metrics rows for {per_seed.loc[dup, [*KEYS, 'seed']].to_dict('records')}")
    rows = []
    for key, g in per_seed.groupby(KEYS, sort=True):
        g = g.sort_values("seed")
        row = {"kind": "spec", **dict(zip(KEYS, key)), "n_seeds": len(g),
               "seeds": ",".join(str(int(s)) for s in g["seed"])}
        for m in AGGREGATED:
            if m in g.columns:
                v = g[m].astype(float).to_numpy()
                # NaN propagates: a metric missing for one seed makes the mean undefined, visibly.
                row[f"{m}_mean"] = float(v.mean())
                row[f"{m}_std"] = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        for s in SETTINGS:
            if s in g.columns:
                row[s] = _setting(g[s].tolist())
        if "mauve_skipped_reason" in g.columns:
            row["mauve_skipped_reason"] = _setting(g["mauve_skipped_reason"].tolist())
        for p in PROVENANCE:
            if p in g.columns:
                row[p] = _join_unique(g[p])
        rows.append(row)
    return pd.DataFrame(rows)


def real_summary(real: pd.DataFrame) -> pd.DataFrame:
    """The real-data reference row(s) in the summary's column names (a single 'seed')."""
    out = aggregate_seeds(real.assign(seed=real.get("seed", -1)))
    out["kind"] = "real"
    return out


def vlb_summary(vlb: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in vlb.columns if c not in ("seed",)]
    out = vlb[keep].copy()
    out.insert(0, "kind", "vlb")
    out["vlb_seed"] = vlb["seed"] if "seed" in vlb.columns else np.nan
    if "spec" not in out.columns:
        out["spec"] = None
    return out


def read_parquet_files(files, what: str) -> pd.DataFrame:
    """The rows of every parquet in ``files``, concatenated; a missing file is named with ``what`` it is."""
    frames = []
    for f in files:
        f = Path(f)
        if not f.exists():
            raise FileNotFoundError(f"{f}: {what} file not found")
        frames.append(pd.read_parquet(f))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def summarize(metric_files, real_file=None, vlb_files=()) -> pd.DataFrame:
    """The summary table from per-seed metric files, the real-data file and VLB files."""
    parts = []
    per_seed = read_parquet_files(metric_files, "metrics")
    if len(per_seed):
        parts.append(aggregate_seeds(per_seed))
    if real_file is not None:
        parts.append(real_summary(read_parquet_files([real_file], "real-data metrics")))
    vlb = read_parquet_files(vlb_files, "VLB")
    if len(vlb):
        parts.append(vlb_summary(vlb))
    if not parts:
        raise ValueError("nothing to summarise: no metrics, real-data or VLB files")
    out = pd.concat(parts, ignore_index=True)
    order = {"real": 0, "spec": 1, "vlb": 2}
    out = out.sort_values(by=["kind", "model", "spec"], key=lambda s: s.map(order) if s.name == "kind" else s,
                          na_position="first", kind="stable").reset_index(drop=True)
    return out


def find_inputs(run_dir) -> tuple[list[Path], Path | None, list[Path]]:
    """metrics/{model}/{spec}/seed*.parquet, metrics/real.parquet, metrics/{model}/vlb.parquet of a run."""
    metrics = Path(run_dir) / "metrics"
    seeds = sorted(metrics.glob("*/*/seed*.parquet"))
    real = metrics / "real.parquet"
    vlbs = sorted(metrics.glob("*/vlb.parquet"))
    return seeds, (real if real.exists() else None), vlbs


@stage_main("summary")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.summary", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="results/{run}")
    ap.add_argument("--out", required=True, help="results/{run}/summary.parquet")
    ap.add_argument("--inputs", nargs="*", default=None,
                    help="explicit metric / real / vlb parquet files (default: everything under "
                         "{run-dir}/metrics; pass the rule's inputs so stale files of removed specs "
                         "are not summarised)")
    args = ap.parse_args(argv)
    try:
        if args.inputs is None:
            seeds, real, vlbs = find_inputs(args.run_dir)
        else:
            files = [Path(f) for f in args.inputs]
            seeds = [f for f in files if f.name.startswith("seed")]
            real = next((f for f in files if f.name == "real.parquet"), None)
            vlbs = [f for f in files if f.name == "vlb.parquet"]
        if not seeds and real is None:
            raise FileNotFoundError(f"{args.run_dir}/metrics: no seed*.parquet or real.parquet to summarise")
        table = summarize(seeds, real, vlbs)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"summary: {err}")
    write_parquet(args.out, table)
    print(f"[summary] {len(seeds)} seed files, real={'yes' if real else 'no'}, {len(vlbs)} VLB files "
          f"-> {len(table)} rows in {args.out}", file=sys.stderr)
    cols = [c for c in ("kind", "model", "spec", "n_seeds", "gen_ppl_mean", "gen_ppl_std", "entropy_mean",
                        "vlb_bpb") if c in table.columns]
    print(table[cols].to_string(index=False), file=sys.stderr)


if __name__ == "__main__":
    main()
