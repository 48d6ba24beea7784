"""Import time and peak memory of a paper-size (CoBit-S) checkpoint in the official release layout.

Builds CoBit-S (LM1B: P = 15, L = 128, 133,453,377 parameters) with random weights, saves it the way
the official ``make_release_checkpoint.py`` does (``{"model": EMA-baked state dict, "global_step",
"epoch", "ema_decay", "source_checkpoint", "note"}``, fp32), then runs the ``import_model`` stage on it
as a fresh process -- exactly what the workflow's job does: sha256 of the file, strict load with every
shape checked, writing final.pt, copying the released entropy tables -- and reports

* ``wall``      -- the job including interpreter start-up (``import_seconds``: resolve + load + check),
* ``peak RSS``  -- the child's maximum resident set size (``getrusage(RUSAGE_CHILDREN)``),

beside the file size, and checks that the imported weights equal the ones saved.

    .venv/bin/python benchmarks/bench_import.py [--tables reference/entropy_tables/lm1b] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
COBIT_S = dict(embed_dim=768, n_blocks=12, n_heads=12, dim_ff=3072, content_dim=64, head_hidden=128)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default=str(REPO.parent / "shared" / "reference" / "entropy_tables" / "lm1b"),
                    help="a directory with the four entropy tables (the released lm1b ones by default)")
    ap.add_argument("--keep", default=None, help="scratch directory to keep (default: a temporary one)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from bitstream.checkpoint import build_model, load_model

    scratch = Path(args.keep or tempfile.mkdtemp(prefix="bench_import_"))
    scratch.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build_model(COBIT_S, bits=15, seq_len=128)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    n_params = sum(p.numel() for p in model.parameters())
    release = scratch / "cobit_s_lm1b_release.pt"
    state = model.state_dict()
    torch.save({"model": state, "global_step": 1_000_000, "epoch": 0, "ema_decay": 0.9999,
                "source_checkpoint": "runs/bench/step=001000000.pt", "note": "benchmark stand-in"}, release)
    size_mb = release.stat().st_size / 2**20
    del model

    params = {"source": "import", "architecture": COBIT_S,
              "import": {"checkpoint": str(release), "entropy_tables": args.tables, "format": "official"}}
    out_dir = scratch / "models" / "cobit_s_lm1b_released"
    cmd = [sys.executable, "-m", "bitstream.import_model", "--params", json.dumps(params), "--bits", "15",
           "--seq-len", "128", "--out-dir", str(out_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    record = json.loads((out_dir / "import.json").read_text())
    imported, meta = load_model(out_dir / "checkpoints" / "final.pt")
    same = all(torch.equal(v, state[k]) for k, v in imported.state_dict().items())
    print(f"CoBit-S LM1B, {n_params:,} parameters, release file {size_mb:.0f} MiB (fp32)")
    print(f"import job: wall {wall:.1f}s (import_seconds {record['import_seconds']:.2f}s: resolve + sha256 + "
          f"load + shape check), peak RSS {peak_mb:.0f} MiB ({peak_mb / size_mb:.2f}x the file)")
    print(f"imported weights equal the saved ones: {same}; sc_absent {meta['architecture']['sc_absent']}, "
          f"step {meta['step']}")
    print(f"(machine shared with other jobs: timings are pessimistic; scratch {scratch})")


if __name__ == "__main__":
    main()
