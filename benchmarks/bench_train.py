"""Training throughput of a configured model (default: ``sdt_tiny`` of config/config.yaml) on this machine.

    .venv/bin/python benchmarks/bench_train.py                          # both default runs' shapes, 1500 steps
    .venv/bin/python benchmarks/bench_train.py --run lm1b_web --steps 200
    .venv/bin/python benchmarks/bench_train.py --cache-dir results/lm1b_web/cache --run lm1b_web

Runs the real training stage (:func:`bitstream.train.train`) with the config's model section, one CPU
thread unless ``--threads`` says otherwise (the embedded default gives each training job one core).
Without ``--cache-dir`` it writes a synthetic cache of the run's shape (``bits``, ``seq_len``, Zipf
token ids over ``2**bits`` codes) in a temporary directory. Prints steps/s, bits/s, the wall time,
loss (first / last log interval), the EMA validation loss, and when the entropy schedule switched on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    runs = args.run or list(cfg["runs"])
    model = cfg["models"][args.model]
    params = {"architecture": model.get("architecture", {}), "training": dict(model.get("training", {})),
              "resources": model.get("resources", {})}
    if args.steps:
        params["training"]["steps"] = args.steps
    params["training"]["num_threads"] = args.threads
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            rc = cfg["runs"][run]
            bits, seq_len = int(rc["bits"]), int(rc["seq_len"])
            cache = Path(args.cache_dir) if args.cache_dir else synthetic_cache(Path(tmp) / run / "cache", bits, seq_len)
            t0 = time.monotonic()
            s = train(cache, bits, seq_len, params, Path(tmp) / run / "model", device="cpu")
            wall = time.monotonic() - t0
            rows.append((run, bits, seq_len, s, wall))
    for run, bits, seq_len, s, wall in rows:
        print(f"{run}: {args.model} ({s['n_params']:,} params), {s['step']} steps of "
              f"{params['training'].get('batch_size')} x {seq_len} tokens x {bits} bits, {args.threads} thread(s): "
              f"{s['steps_per_s']:.2f} steps/s, {s['bits_per_s']:.3g} bits/s, wall {wall:.0f} s "
              f"(train loop {s['wall_time_s']:.0f} s); loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}, "
              f"val (EMA) {s['val_loss_last']:.4f}; entropy tables ready at step {s['entropy_ready_step']}, "
              f"first mixed-in at step {s['entropy_first_gamma_step']}")


if __name__ == "__main__":
    main()
