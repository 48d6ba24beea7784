"""Variational bound of the continuous bit model in bits per bit (spec §9.5).

For one clean row ``x0 ∈ {0,1}^S`` and the denoiser ``D = sigmoid(ℓ(x, σ, x̂0))``::

    recon = Σ_i BCEWithLogits(ℓ(x0 + σ_0 ε, σ_0), x0_i)                          σ_0 = 0.08
    diff  = Σ_i (sigmoid(ℓ(x0 + σ ε, σ)) − x0_i)² / σ² · ln(σ_max / σ_0)          ln σ ~ U[ln σ_0, ln σ_max]
    prior = ½ Σ_i x0_i² / σ_max²                                                  (optional, off by default)
    VLB   = (prior + recon + diff) / (S ln 2)                                      bits per bit

``diff`` is a one-draw Monte-Carlo estimate of ``∫ ‖x0 − D‖² / σ² d ln σ`` over ``[σ_0, σ_max]``, the VE form
of ``½ ∫ ‖x0 − D‖² d snr``: the uniform density of ``y = ln σ`` is ``1/ln(σ_max/σ_0)`` (= 1/ln 1000),
whence the factor. One draw of ``σ`` per example (K = 1, like upstream), seeded.

Self-conditioning: the bound is evaluated with ``x̂0 = None`` ("absent", all bits at probability 0.5),
the project's single SC convention (contract; upstream passed zeros here, spec §7/§14.9).
The prior term follows upstream (``x0²``, not ``(x0 − ½)²``); it is ~1e-5 bits/bit at σ_max = 80.

CLI::

    python -m bitstream.vlb --checkpoint results/{run}/models/{model}/checkpoints/final.pt \
        --cache-dir results/{run}/cache --params '<run evaluation json>' --out results/{run}/metrics/{model}/vlb.parquet
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bitstream.io import parse_json_arg, provenance, stage_main, write_parquet
from bitstream.progress import Progress

SIGMA_MIN_EVAL = 0.08   # σ_0: the terminal σ of the samplers and the decoder's noise level
SIGMA_MAX = 80.0

# denoiser(x [B, S], sigma [B], x0_hat or None) -> logits ℓ [B, S] (fp32), matched filter included
Denoiser = Callable


def vlb_terms(denoiser: Denoiser, x0, generator, sigma_min: float = SIGMA_MIN_EVAL,
              sigma_max: float = SIGMA_MAX) -> dict:
    """Per-example recon, diff and prior terms (nats, summed over the S bits) for a batch ``x0`` [B, S].

    Random numbers come from ``generator`` (a CPU ``torch.Generator``) in a fixed order — recon noise,
    then ln σ, then diffusion noise — and are moved to ``x0``'s device, so a seed gives the same value
    on any device.
    """
    import torch
    import torch.nn.functional as F

    x0 = x0.float()
    B, S = x0.shape
    dev = x0.device
    eps_recon = torch.randn(B, S, generator=generator).to(dev)
    u = torch.rand(B, generator=generator, dtype=torch.float64)
    eps_diff = torch.randn(B, S, generator=generator).to(dev)
    log_range = math.log(sigma_max / sigma_min)  # = 1/q(y) for the log-uniform proposal

    with torch.no_grad():
        s0 = torch.full((B,), sigma_min, device=dev)
        logits = denoiser(x0 + sigma_min * eps_recon, s0, None).float()
        recon = F.binary_cross_entropy_with_logits(logits, x0, reduction="none").sum(1)

        sigma64 = torch.exp(math.log(sigma_min) + u * log_range)
        sigma = sigma64.float().to(dev)
        logits = denoiser(x0 + sigma[:, None] * eps_diff, sigma, None).float()
        sq_err = (torch.sigmoid(logits) - x0).pow(2).sum(1)
        diff = sq_err / sigma.pow(2) * log_range

        prior = 0.5 * x0.pow(2).sum(1) / sigma_max**2
    return {"recon": recon.double().cpu(), "diff": diff.double().cpu(), "prior": prior.double().cpu(),
            "sigma": sigma64}


def vlb_bits_per_bit(denoiser: Denoiser, bits, batch_size: int, seed: int = 0, include_prior: bool = False,
                     sigma_min: float = SIGMA_MIN_EVAL, sigma_max: float = SIGMA_MAX, device="cpu",
                     progress: bool = False) -> dict:
    """The VLB of rows ``bits`` [N, S] (0/1) in bits per bit, with its terms and standard error."""
    import torch

    bits = torch.as_tensor(np.asarray(bits), dtype=torch.float32)
    N, S = bits.shape
    gen = torch.Generator().manual_seed(int(seed))
    parts = {"recon": [], "diff": [], "prior": []}
    bar = Progress(N, "vlb", unit="row") if progress else None
    for i in range(0, N, batch_size):
        terms = vlb_terms(denoiser, bits[i:i + batch_size].to(device), gen, sigma_min, sigma_max)
        for k in parts:
            parts[k].append(terms[k])
        if bar is not None:
            bar.update(len(terms["recon"]))
    if bar is not None:
        bar.close()
    to_bpb = 1.0 / (S * math.log(2))
    t = {k: torch.cat(v).numpy() * to_bpb for k, v in parts.items()}
    total = t["recon"] + t["diff"] + (t["prior"] if include_prior else 0.0)
    return {
        "vlb_bpb": float(total.mean()),
        "vlb_bpb_sem": float(total.std(ddof=1) / math.sqrt(N)) if N > 1 else float("nan"),
        "recon_bpb": float(t["recon"].mean()),
        "diff_bpb": float(t["diff"].mean()),
        "prior_bpb": float(t["prior"].mean()),
        "include_prior": bool(include_prior),
        "n_rows": int(N),
        "bits_per_row": int(S),
        "sigma_min_eval": float(sigma_min),
        "sigma_max": float(sigma_max),
        "sigma_proposal": "log_uniform",
        "mc_draws_per_row": 1,
        "seed": int(seed),
    }


# ---------------------------------------------------------------------------------------------------
# CLI


def _run_and_model(checkpoint: Path) -> tuple[str | None, str | None]:
    """results/{run}/models/{model}/checkpoints/final.pt -> (run, model)."""
    parts = checkpoint.resolve().parts
    if len(parts) >= 5 and parts[-2] == "checkpoints" and parts[-4] == "models":
        return parts[-5], parts[-3]
    return None, None


@stage_main("vlb")
def main(argv: list[str] | None = None) -> None:
    import pandas as pd
    import torch

    ap = argparse.ArgumentParser(prog="python -m bitstream.vlb", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="results/{run}/models/{model}/checkpoints/final.pt")
    ap.add_argument("--cache-dir", required=True, help="results/{run}/cache (the test split is used)")
    ap.add_argument("--params", required=True, help="the run's evaluation section (JSON or @file)")
    ap.add_argument("--out", required=True, help="results/{run}/metrics/{model}/vlb.parquet")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--include-prior", action="store_true", help="add the prior term (upstream default: off)")
    ap.add_argument("--run", default=None, help="run name (default: from the checkpoint path)")
    ap.add_argument("--model", default=None, help="model name (default: from the checkpoint path)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (the rule passes the job's "
                                                            "cpus; 0 = torch's default)")
    args = ap.parse_args(argv)
    from bitstream.cpu import setup_torch

    setup_torch(args.threads)
    params = parse_json_arg(args.params)
    params.pop("resources", None)
    batches, batch_size = int(params.get("vlb_batches", 50)), int(params.get("vlb_batch_size", 32))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = Path(args.checkpoint)
    try:
        from bitstream.bits import ids_to_bits
        from bitstream.checkpoint import load_model
        from bitstream.diffusion import denoise_logits
        from bitstream.token_cache import load_cache

        if not checkpoint.exists():
            raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
        model, meta = load_model(str(checkpoint), device=str(device))
        if getattr(getattr(model, "cfg", None), "representation", "bits") != "bits":
            raise ValueError(f"{checkpoint}: a token-space baseline (architecture.representation: tokens); "
                             f"the bit samplers and the bit VLB do not apply to it")
        width, seq_len = int(meta["bits"]), int(meta["seq_len"])
        prefix = Path(args.cache_dir) / args.split
        rows, _ = load_cache(prefix)
        if rows.shape[1] != seq_len:
            raise ValueError(f"{prefix}: rows of {rows.shape[1]} tokens, but {checkpoint} was trained on "
                             f"seq_len {seq_len}")
        n = min(len(rows), batches * batch_size)
        if n < batches * batch_size:
            print(f"[vlb] {prefix} holds {len(rows)} rows; using all of them "
                  f"(vlb_batches x vlb_batch_size = {batches * batch_size})", file=sys.stderr)
        bits = ids_to_bits(np.asarray(rows[:n]).astype(np.int64), width)
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise SystemExit(f"vlb: {err}")

    arch = meta.get("architecture", {})
    mode, clip = arch.get("logit_mode", "matched_filter_residual"), float(arch.get("mf_clip", 30.0))

    def denoiser(x, sigma, x0_hat):
        return denoise_logits(model, x, sigma, x0_hat, mode=mode, clip=clip)

    t0 = time.monotonic()
    result = vlb_bits_per_bit(denoiser, bits, batch_size, seed=args.seed, include_prior=args.include_prior,
                              device=device, progress=True)
    run, model_name = _run_and_model(checkpoint)
    row = {"run": args.run or run, "model": args.model or model_name, **result,
           "split": args.split, "checkpoint": str(checkpoint), "step": meta.get("step"),
           "logit_mode": mode, "device": str(device), "wall_time_s": time.monotonic() - t0,
           **provenance(params)}
    write_parquet(args.out, pd.DataFrame([row]))
    print(f"[vlb] {row['vlb_bpb']:.4f} ± {row['vlb_bpb_sem']:.4f} bits/bit (recon {row['recon_bpb']:.4f}, "
          f"diff {row['diff_bpb']:.4f}, prior {row['prior_bpb']:.2e}) over {n} rows -> {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
