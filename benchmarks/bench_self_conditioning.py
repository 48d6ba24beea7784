"""Cost of the self-conditioning pass: upstream vs ours (spec §7).

    .venv/bin/python benchmarks/bench_self_conditioning.py                 # default sdt_tiny shapes
    .venv/bin/python benchmarks/bench_self_conditioning.py --paper-size    # CoBit-S LM1B (slow on a CPU)

Upstream runs the self-conditioning estimate on the whole batch with autograd on and keeps the rows
chosen for self-conditioning (about half). The training stage here runs it under ``no_grad`` on the
chosen rows only (``bitstream.train.diffusion_loss``). This prints the time of one full training step
(SC pass + forward + backward) both ways, and the time of the SC pass alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitstream.diffusion import binary_sm_loss, denoise_logits  # noqa: E402
from bitstream.model import SDT, SDTConfig  # noqa: E402


def step(model, x0, sigma, sc, upstream: bool) -> float:
    """One training step; returns the seconds spent in the self-conditioning pass."""
    x = x0 + sigma[:, None] * torch.randn_like(x0)
    t0 = time.perf_counter()
    x0_hat = torch.full_like(x, 0.5)
    if upstream:  # whole batch, autograd on, keep the chosen rows
        p = torch.sigmoid(denoise_logits(model, x, sigma, None)).detach()
        x0_hat[sc] = p[sc]
    else:
        with torch.no_grad():
            x0_hat[sc] = torch.sigmoid(denoise_logits(model, x[sc], sigma[sc], None))
    t_sc = time.perf_counter() - t0
    loss = binary_sm_loss(denoise_logits(model, x, sigma, x0_hat), x0, sigma)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return t_sc


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paper-size", action="store_true", help="CoBit-S LM1B (133M) instead of sdt_tiny")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.paper_size:
        cfg = SDTConfig(patch_size=15, seq_len=128, dropout=0.0)
        batch, steps = args.batch or 4, args.steps or 3
    else:
        cfg = SDTConfig(embed_dim=128, n_blocks=2, n_heads=4, dim_ff=384, content_dim=16, head_hidden=32,
                        dropout=0.0, patch_size=11, seq_len=32)
        batch, steps = args.batch or 32, args.steps or 30
    model = SDT(cfg)
    x0 = torch.randint(0, 2, (batch, cfg.seq_len * cfg.patch_size)).float()
    sigma = torch.exp(torch.randn(batch) * 1.2 - 1.2)
    sc = torch.arange(batch) % 2 == 0  # the expected half (training draws Bernoulli(0.5) per row)
    print(f"model {sum(p.numel() for p in model.parameters()):,} params, batch {batch}, "
          f"{int(sc.sum())} rows self-conditioned, {args.threads} thread(s)")
    for upstream in (True, False):  # warm-up
        step(model, x0, sigma, sc, upstream)
    results = {}
    for upstream in (True, False):
        t_sc, t0 = 0.0, time.perf_counter()
        for _ in range(steps):
            t_sc += step(model, x0, sigma, sc, upstream)
        results[upstream] = (t_sc / steps, (time.perf_counter() - t0) / steps)
    for upstream, name in ((True, "upstream: whole batch, autograd on"), (False, "ours: chosen rows, no_grad")):
        sc_s, step_s = results[upstream]
        print(f"{name:<38} SC pass {1e3 * sc_s:8.1f} ms   training step {1e3 * step_s:8.1f} ms")
    saved = 1 - results[False][1] / results[True][1]
    print(f"training step {saved:.0%} faster; SC pass {results[True][0] / results[False][0]:.2f}x cheaper")


if __name__ == "__main__":
    main()
