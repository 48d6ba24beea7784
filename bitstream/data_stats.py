"""Stage ``data_stats``: real-data unigram entropy of every cache split (spec §9.3).

For each split the model-input cache is turned into the ids the entropy is defined on -- LM1B: the
``seq_len`` base ids of each block, specials included; OWT: the base ids the inverse codec gives
back for each code row (stop at PAD/EOSEQ, framing EOS stripped, internal EOS kept; spec §1.5) --
and the per-row unigram entropy (nats) is averaged over rows (:func:`bitstream.entropy`, the same
function the sample metrics use). All rows are used (upstream's real reference uses the first 1024
test rows; ``bitstream.metrics --real`` produces that row). Output: one parquet row per split with
counts and provenance columns.

CLI: ``python -m bitstream.data_stats --run-dir results/{run} --params '{"style":...}' --out
results/{run}/metrics/data_stats.parquet``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bitstream.entropy import per_sample_unigram_entropy
from bitstream.io import parse_json_arg, provenance, stage_main, write_parquet
from bitstream.progress import Progress

SPLITS = ("train", "validation", "test")
ROWS_PER_CHUNK = 8192


def split_stats(run_dir: Path, split: str, style: str, decoder) -> dict:
    from bitstream.token_cache import load_cache

    rows, meta = load_cache(run_dir / "cache" / split, expect={"style": style})
    n = len(rows)
    h_sum = h_sq = 0.0
    n_base = n_invalid = 0
    t0 = time.monotonic()
    with Progress(n, f"data_stats {split}", unit="row") as progress:
        for start in range(0, n, ROWS_PER_CHUNK):
            block = np.asarray(rows[start:start + ROWS_PER_CHUNK], dtype=np.int64)
            base, invalid = decoder.base_ids(block)
            h = per_sample_unigram_entropy(block if style == "lm1b" and not any(invalid) else base)
            h_sum += float(h.sum())
            h_sq += float((h * h).sum())
            n_base += sum(len(b) for b in base)
            n_invalid += int(sum(invalid))
            progress.update(len(block))
    mean = h_sum / n if n else float("nan")
    return {
        "split": split, "style": style, "n_rows": n, "seq_len": int(meta["seq_len"]),
        "bits": meta.get("bits"), "vocab_size": meta.get("vocab_size"),
        "entropy": mean, "entropy_std": float(np.sqrt(max(h_sq / n - mean * mean, 0.0))) if n else float("nan"),
        "entropy_unit": "nats", "n_base_tokens": n_base, "mean_base_len": n_base / n if n else float("nan"),
        "n_invalid": n_invalid, "cache_format": meta.get("format"),
        "wall_time_s": round(time.monotonic() - t0, 3),
    }


def data_stats(run_dir, params: dict):
    import pandas as pd

    from bitstream.decode import TextDecoder

    style = params.get("style")
    if style not in ("lm1b", "owt"):
        raise ValueError(f"--params: style must be 'lm1b' or 'owt', got {style!r}")
    run_dir = Path(run_dir)
    decoder = TextDecoder.from_run_dir(run_dir)
    if decoder.style != style:
        raise ValueError(f"{run_dir}/tokenizer/base/meta.json: style {decoder.style!r}, --params says {style!r}")
    prov = provenance(params)
    rows = [{"run": run_dir.name, **split_stats(run_dir, s, style, decoder), **prov} for s in SPLITS]
    for r in rows:
        print(f"[data_stats] {r['split']}: {r['n_rows']} rows, unigram entropy {r['entropy']:.4f} nats "
              f"(mean base length {r['mean_base_len']:.1f})", file=sys.stderr)
    return pd.DataFrame(rows)


@stage_main("data_stats")
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.data_stats", description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="results/{run}")
    ap.add_argument("--params", required=True, help='{"style": ...}')
    ap.add_argument("--out", required=True, help="results/{run}/metrics/data_stats.parquet")
    args = ap.parse_args(argv)
    try:
        df = data_stats(args.run_dir, parse_json_arg(args.params))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"data_stats: {err}")
    write_parquet(args.out, df)


if __name__ == "__main__":
    main()
