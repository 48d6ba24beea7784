"""Token-cache build speed on the embedded corpus, 1 vs N workers.

Upstream builds its caches on one core; this measures what ``workers`` buys. For each style (the
LM1B-style WordPiece packing and the OWT-style byte-level BPE framing, the default runs' tokenizers)
it builds the corpus and tokenizer once in a scratch directory, then runs the ``token_cache`` stage
as a fresh process per worker count (so each run starts with a cold tokenizer thread pool, exactly
like a Snakemake job) and reports

* ``tok/s``  -- tokens per second of the tokenise+pack+write loop (from the cache meta), and
* ``wall``   -- the whole job including interpreter start-up and worker spawning,

and checks that every worker count writes byte-identical caches. ``--repeat K`` concatenates the
train split K times to measure a larger corpus (spawning workers costs a fixed ~0.5 s, which a
1-2 s job cannot amortise).

    .venv/bin/python benchmarks/bench_data.py [--workers 1 2] [--repeat 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = {
    "lm1b_web": {"corpus": {"source": "builtin:web"},
                 "tokenizer": {"kind": "wordpiece", "vocab_size": 2000},
                 "cache": {"style": "lm1b", "seq_len": 32, "bits": 11}},
    "owt_web": {"corpus": {"source": "builtin:web", "lines_per_document": 12},
                "tokenizer": {"kind": "bytebpe", "vocab_size": 1024},
                "cache": {"style": "owt", "seq_len": 48, "base_seq_len": 96, "bits": 12}},
}


def _busy(n: int) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t0


def free_cores(workers: int, n: int = 5_000_000) -> float:
    """How many cores this machine gives us right now: ``workers`` busy loops at once vs one alone.

    On a shared machine the other users' load caps any speed-up; printing this makes a flat
    "2 workers" line readable (1.0 = only one core free, 2.0 = two).
    """
    import multiprocessing as mp

    alone = _busy(n)
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_busy, [1] * workers)  # wait until every worker has started
        t0 = time.perf_counter()
        pool.map(_busy, [n] * workers)
        together = time.perf_counter() - t0
    return workers * alone / together


def _stage(module: str, *args: str, params: dict) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAYON_NUM_THREADS", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", f"bitstream.{module}", *args, "--params", json.dumps(params)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"bitstream.{module} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1, help="concatenate the train split this many times")
    ap.add_argument("--keep", default=None, help="scratch directory to use and keep (default: a temp dir)")
    args = ap.parse_args(argv)
    scratch = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_data_"))
    print(f"# token_cache build speed, embedded corpus x{args.repeat}, {os.cpu_count()} CPUs visible, "
          f"~{free_cores(max(args.workers)):.2f} free now (busy-loop probe); scratch: {scratch}")
    print(f"{'run':<10} {'workers':>7} {'tokens':>10} {'tok/s':>11} {'speed-up':>8} {'wall s':>7}")
    for run, cfg in RUNS.items():
        d = scratch / run
        style = cfg["cache"]["style"]
        _stage("corpus", "--out-dir", str(d / "corpus"), params={"style": style, "corpus": cfg["corpus"]})
        _stage("tokenizer", "--corpus-dir", str(d / "corpus"), "--out-dir", str(d / "tokenizer"),
               params={"style": style, "tokenizer": cfg["tokenizer"], "bits": cfg["cache"]["bits"]})
        if args.repeat > 1:
            text = (d / "corpus" / "train.jsonl").read_bytes()
            (d / "corpus" / "train.jsonl").write_bytes(text * args.repeat)
        base_rate, reference = None, None
        for w in args.workers:
            prefix = d / f"cache_w{w}" / "train"
            wall = _stage("token_cache", "--corpus-dir", str(d / "corpus"), "--tokenizer-dir", str(d / "tokenizer"),
                          "--split", "train", "--out", str(prefix), "--workers", str(w), params=cfg["cache"])
            suffix = ".u16" if style == "lm1b" else ".base.u16"
            meta = json.loads(Path(str(prefix) + suffix.replace(".u16", ".meta.json")).read_text())
            data = Path(str(prefix) + suffix).read_bytes()
            if reference is None:
                reference = data
            elif data != reference:
                raise SystemExit(f"{run}: the cache written with {w} workers differs from the first one")
            rate = meta["throughput"]["tokens_per_s"]
            base_rate = base_rate or rate
            print(f"{run:<10} {w:>7} {meta['throughput']['tokens']:>10} {rate:>11.3g} {rate / base_rate:>7.2f}x "
                  f"{wall:>7.2f}")
    print("# identical caches for every worker count: yes")


if __name__ == "__main__":
    main()
