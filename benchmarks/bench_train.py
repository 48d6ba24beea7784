"""Training throughput of a configured model (default: ``sdt_tiny`` of config/config.yaml) on this machine.

    .venv/bin/python benchmarks/bench_train.py                          # both default runs' shapes, 1500 steps
    .venv/bin/python benchmarks/bench_train.py --run lm1b_web --steps 200
    .venv/bin/python benchmarks/bench_train.py --cache-dir results/lm1b_web/cache --run lm1b_web
    .venv/bin/python benchmarks/bench_train.py --run lm1b_web --steps 12 --subnormals both \
        --embed-dim 256 --n-blocks 4 --n-heads 4 --dim-ff 1024 --seq-len 128 --bits 15 --batch-size 16

``--subnormals both`` runs the benchmark twice in fresh processes, once keeping subnormal floats
(``BITSTREAM_KEEP_SUBNORMALS=1``, the behaviour before issue 12) and once flushing them
(:mod:`bitstream.cpu`), and prints the speed ratio. The size flags override the config's model.

Runs the real training stage (:func:`bitstream.train.train`) with the config's model section, one CPU
thread unless ``--threads`` says otherwise (the embedded default gives each training job one core).
Without ``--cache-dir`` it writes a synthetic cache of the run's shape (``bits``, ``seq_len``, Zipf
token ids over ``2**bits`` codes) in a temporary directory. Prints steps/s, bits/s, the wall time,
loss (first / last log interval), the EMA validation loss, and when the entropy schedule switched on.
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

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitstream.cpu import KEEP_SUBNORMALS_ENV, setup_torch  # noqa: E402
from bitstream.train import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def synthetic_cache(directory: Path, bits: int, seq_len: int, n_train: int = 20000, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = 2**bits
    for split, n in (("train", n_train), ("validation", max(n_train // 50, 256))):
        ids = np.minimum(rng.zipf(1.3, size=(n, seq_len)) - 1, vocab - 1).astype(np.uint16)
        ids.tofile(directory / f"{split}.u16")
        (directory / f"{split}.meta.json").write_text(json.dumps(
            {"n_rows": n, "seq_len": seq_len, "n_sequences": n, "seq_len_tokens": seq_len, "vocab_size": vocab,
             "dtype": "uint16", "synthetic": True}))
    return directory


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--model", default="sdt_tiny")
    ap.add_argument("--run", action="append", help="run name(s) whose bits / seq_len to use (default: all runs)")
    ap.add_argument("--cache-dir", default=None, help="a real cache (only with a single --run)")
    ap.add_argument("--steps", type=int, default=None, help="override training.steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--subnormals", choices=("flush", "keep", "both"), default="flush",
                    help="flush subnormal floats (the stages' behaviour), keep them, or compare both")
    for flag in ("embed-dim", "n-blocks", "n-heads", "dim-ff"):
        ap.add_argument(f"--{flag}", type=int, default=None, help="override architecture." + flag.replace("-", "_"))
    ap.add_argument("--batch-size", type=int, default=None, help="override training.batch_size")
    ap.add_argument("--seq-len", type=int, default=None, help="override the run's seq_len (synthetic cache)")
    ap.add_argument("--bits", type=int, default=None, help="override the run's bits (synthetic cache)")
    args = ap.parse_args(argv)
    if args.subnormals == "both":
        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        i = rest.index("--subnormals")
        rest[i + 1:i + 2] = []
        del rest[i]
        rates = {}
        for mode in ("keep", "flush"):
            out = subprocess.run([sys.executable, __file__, *rest, "--subnormals", mode], check=True,
                                 capture_output=True, text=True).stdout
            print(out, end="", flush=True)
            rates[mode] = [float(line.split(" steps/s")[0].rsplit(" ", 1)[1]) for line in out.splitlines()
                           if " steps/s" in line]
        for k, (keep, flush) in enumerate(zip(rates["keep"], rates["flush"])):
            print(f"subnormals flushed vs kept (row {k}): {flush / keep:.2f}x the steps/s")
        return
    if args.subnormals == "keep":
        os.environ[KEEP_SUBNORMALS_ENV] = "1"
    setup_torch(args.threads)
    cfg = yaml.safe_load(Path(args.config).read_text())
    runs = args.run or list(cfg["runs"])
    model = cfg["models"][args.model]
    params = {"architecture": model.get("architecture", {}), "training": dict(model.get("training", {})),
              "resources": model.get("resources", {})}
    for flag in ("embed_dim", "n_blocks", "n_heads", "dim_ff"):
        if getattr(args, flag) is not None:
            params["architecture"][flag] = getattr(args, flag)
    if args.batch_size:
        params["training"]["batch_size"] = args.batch_size
    if args.steps:
        params["training"]["steps"] = args.steps
    params["training"]["num_threads"] = args.threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            rc = cfg["runs"][run]
            bits, seq_len = int(args.bits or rc["bits"]), int(args.seq_len or rc["seq_len"])
            cache = Path(args.cache_dir) if args.cache_dir else synthetic_cache(Path(tmp) / run / "cache", bits, seq_len)
            t0 = time.monotonic()
            s = train(cache, bits, seq_len, params, Path(tmp) / run / "model", device="cpu")
            wall = time.monotonic() - t0
            rows.append((run, bits, seq_len, s, wall))
    for run, bits, seq_len, s, wall in rows:
        print(f"{run}: {args.model} ({s['n_params']:,} params), {s['step']} steps of "
              f"{params['training'].get('batch_size')} x {seq_len} tokens x {bits} bits, {args.threads} thread(s), subnormals {args.subnormals}: "
              f"{s['steps_per_s']:.2f} steps/s, {s['bits_per_s']:.3g} bits/s, wall {wall:.0f} s "
              f"(train loop {s['wall_time_s']:.0f} s); loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}, "
              f"val (EMA) {s['val_loss_last']:.4f}; entropy tables ready at step {s['entropy_ready_step']}, "
              f"first mixed-in at step {s['entropy_first_gamma_step']}")


if __name__ == "__main__":
    main()
