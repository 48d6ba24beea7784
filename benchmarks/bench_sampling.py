"""Sampling throughput on this machine: samples/s and network calls/s at 64 and 256 NFE (spec §8, §11),
and what our per-sample noise streams (spec §14.20 fix) cost compared with one batched stream.

    .venv/bin/python benchmarks/bench_sampling.py                       # untrained sdt_tiny of the default config
    .venv/bin/python benchmarks/bench_sampling.py --checkpoint results/lm1b_web/models/sdt_tiny/checkpoints/final.pt
    .venv/bin/python benchmarks/bench_sampling.py --paper-size --batch 2 --nfe 8   # 133M CoBit-S, LM1B shape

Without ``--checkpoint`` the model is an untrained SDT with the architecture of ``--model`` in
``--config`` (the embedded default's ``sdt_tiny``) and the bits / seq_len of ``--run``; its gates are
zero, so it costs exactly what a trained one costs. The sampler is ``ddim_karras`` (no tables needed)
with churn γ = 0.2 on the full band and carry self-conditioning, i.e. the paper's per-step work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bitstream.cpu import setup_torch  # noqa: E402
from bitstream.sample import generate_bits  # noqa: E402
from bitstream.samplers import SampleNoise, model_denoiser, plan_from_spec  # noqa: E402

ARCH_DEFAULTS = {  # workflow/schemas/config.schema.yaml $defs/architecture (CoBit-S, spec §6.1)
    "embed_dim": 768, "n_blocks": 12, "n_heads": 12, "dim_ff": 3072, "content_dim": 64, "head_hidden": 128,
    "dropout": 0.1, "rope_base": 10000.0, "self_condition": True, "logit_mode": "matched_filter_residual",
    "mf_clip": 30.0, "attention": "sdpa",
}


def load(args):
    from bitstream.checkpoint import build_model, load_model

    if args.checkpoint:
        model, meta = load_model(args.checkpoint, device=args.device)
        return model, meta["architecture"], int(meta["bits"]), int(meta["seq_len"]), args.checkpoint
    if args.paper_size:
        arch, bits, seq_len, what = dict(ARCH_DEFAULTS), 15, 128, "untrained CoBit-S (LM1B shape)"
    else:
        import yaml

        cfg = yaml.safe_load(Path(args.config).read_text())
        arch = {**ARCH_DEFAULTS, **cfg["models"][args.model]["architecture"]}
        run = cfg["runs"][args.run]
        bits, seq_len, what = int(run["bits"]), int(run["seq_len"]), f"untrained {args.model} ({args.run} shape)"
    model = build_model(arch, bits, seq_len).to(args.device).eval()
    return model, arch, bits, seq_len, what


def time_noise(batch: int, num_bits: int, steps: int, device) -> tuple[float, float]:
    """Seconds per step for (per-sample streams, one batched stream), drawing [batch, num_bits]."""
    x = torch.zeros(batch, num_bits, device=device)
    streams = SampleNoise(0, range(batch), device)
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for draw in (streams.randn_like, lambda t: torch.randn(t.shape, generator=g, device=t.device)):
        draw(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            draw(x)
        out.append((time.perf_counter() - t0) / steps)
    return out[0], out[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    p.add_argument("--model", default="sdt_tiny")
    p.add_argument("--run", default="lm1b_web")
    p.add_argument("--paper-size", action="store_true", help="untrained 133M CoBit-S on 128 tokens x 15 bits")
    p.add_argument("--batch", type=int, default=64, help="micro-batch = samples per measurement")
    p.add_argument("--nfe", type=int, nargs="+", default=[64, 256])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    setup_torch(args.threads)  # as the sample stage: subnormals flushed

    model, arch, bits, seq_len, what = load(args)
    num_bits = bits * seq_len
    params = sum(p.numel() for p in model.parameters())
    denoiser = model_denoiser(model, mode=arch.get("logit_mode", "matched_filter_residual"),
                              clip=float(arch.get("mf_clip", 30.0)))
    print(f"model: {what}, {params / 1e6:.2f}M params; {seq_len} tokens x {bits} bits = {num_bits} bits; "
          f"batch {args.batch}; device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    # the sampler without a network: the closed-form matched filter as denoiser (its own cost included)
    def matched_filter(x, sigma, x0_hat):
        return ((x - 0.5) / sigma[:, None] ** 2).clamp(-30.0, 30.0)

    print(f"{'nfe':>5} {'wall s':>8} {'samples/s':>10} {'calls/s':>8} {'sample-evals/s':>15} "
          f"{'sampler-only':>13} {'noise ms/step ours | batched':>29} {'noise share':>12} {'extra vs batched':>17}")
    for nfe in args.nfe:
        spec = {"sampler": "ddim_karras", "nfe": nfe, "gamma": 0.2, "window": "full", "sc_mode": "carry"}
        plan = plan_from_spec(spec)
        _, stats = generate_bits(denoiser, plan, num_bits, args.batch, args.batch, seed=0, device=args.device)
        _, bare = generate_bits(matched_filter, plan, num_bits, args.batch, args.batch, seed=0, device=args.device)
        wall = stats["wall_time_s"]
        ours, batched = time_noise(args.batch, num_bits, min(nfe, 64), args.device)
        draws = nfe  # the initial latents + one churn draw per loop step (N - 1 = nfe - 1 for DDIM/carry)
        print(f"{nfe:>5} {wall:>8.2f} {args.batch / wall:>10.2f} {stats['network_calls'] / wall:>8.1f} "
              f"{args.batch * stats['nfe'] / wall:>15.0f} {bare['wall_time_s'] / wall:>12.1%} "
              f"{ours * 1e3:>14.3f} | {batched * 1e3:<12.3f} {ours * draws / wall:>11.2%} "
              f"{(ours - batched) * draws / wall:>16.2%}")
    print("calls/s = batched network calls per second; sample-evals/s = calls/s x batch; sampler-only = the "
          "same run with the closed-form matched filter instead of the network, as a share of the real run "
          "(upper bound of the sampler's own cost); noise share = per-sample noise streams' share of the wall "
          "time; extra vs batched = what they cost beyond one batched generator.")

if __name__ == "__main__":
    main()
