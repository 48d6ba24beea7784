"""What this machine does for the pipeline: fp32 matmul rate, a training step, sampling calls, GenPPL texts.

    .venv/bin/python benchmarks/bench_machine.py                  # 1 thread, the default config's model
    .venv/bin/python benchmarks/bench_machine.py --threads 2 --run owt_web

Prints, for the current machine (and torch's intra-op ``--threads``):

* the fp32 matmul rate (GFLOP/s, best of ``--seconds`` of 2048 x 2048 products);
* the training step of ``--model`` on the shape of ``--run`` (the real stage, :func:`bitstream.train.train`,
  on a synthetic cache): ms per step, and the fraction of the matmul rate it reaches, counting the
  step's FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` (forward, self-conditioning pass and
  backward; the difference of two runs of different lengths, so set-up and validation cancel);
* sampling: network calls per second at the spec's micro-batch (untrained model of the same shape,
  which costs what a trained one costs), entropy-free ``ddim_karras`` with churn γ = 0.2;
* GenPPL: texts per second of batched scoring with a random judge of the default judge's shape on
  texts of the default sample length.

The stages flush subnormal floats (:mod:`bitstream.cpu`); so does this command. The machine may be
shared: compare figures of one run with each other rather than across runs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bitstream.cpu import setup_torch  # noqa: E402


def matmul_rate(seconds: float, n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = 0.0
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best / 1e9


def train_step(cfg: dict, model: str, run: str, steps: int, threads: int) -> tuple[float, float, int]:
    """(ms per step, GFLOP per step, parameters) of the real training stage on a synthetic cache."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench_train import synthetic_cache
    from bitstream.train import train

    m = cfg["models"][model]
    rc = cfg["runs"][run]
    bits, seq_len = int(rc["bits"]), int(rc["seq_len"])
    params = {"architecture": copy.deepcopy(m["architecture"]), "training": copy.deepcopy(m["training"]),
              "resources": {"cpus": threads}}
    t = params["training"]
    t.update(num_threads=threads, checkpoint_every=10**9, val_every=10**9, val_batches=1, log_every=max(1, steps // 4))
    with tempfile.TemporaryDirectory() as tmp:
        cache = synthetic_cache(Path(tmp) / "cache", bits, seq_len, n_train=4096)
        flops = []
        for k, n in enumerate((2, 6)):
            t["steps"] = n
            with FlopCounterMode(display=False) as counter:
                train(cache, bits, seq_len, params, Path(tmp) / f"flops{k}", device="cpu", quiet=True)
            flops.append(counter.get_total_flops())
        per_step = (flops[1] - flops[0]) / 4
        t["steps"] = steps
        s = train(cache, bits, seq_len, params, Path(tmp) / "timed", device="cpu", quiet=True)
    return 1e3 / s["steps_per_s"], per_step / 1e9, int(s["n_params"])


def sampling_calls(cfg: dict, model: str, run: str, spec_name: str, seconds: float) -> tuple[float, int, int]:
    """(network calls/s, micro-batch, nfe) of the sampler on an untrained model of the run's shape."""
    from bench_sampling import ARCH_DEFAULTS
    from bitstream.checkpoint import build_model
    from bitstream.sample import generate_bits
    from bitstream.samplers import model_denoiser, plan_from_spec

    arch = {**ARCH_DEFAULTS, **cfg["models"][model]["architecture"]}
    rc = cfg["runs"][run]
    bits, seq_len = int(rc["bits"]), int(rc["seq_len"])
    net = build_model(arch, bits, seq_len).eval()
    denoiser = model_denoiser(net, mode=arch["logit_mode"], clip=float(arch["mf_clip"]))
    batch = int(cfg["sampler_specs"][spec_name]["micro_batch"])
    nfe = 16
    plan = plan_from_spec({"sampler": "ddim_karras", "nfe": nfe, "gamma": 0.2, "window": "full", "sc_mode": "carry"})
    calls, wall = 0, 0.0
    while wall < seconds:
        _, stats = generate_bits(denoiser, plan, bits * seq_len, batch, batch, seed=0, device="cpu")
        calls += stats["network_calls"]
        wall += stats["wall_time_s"]
    return calls / wall, batch, nfe


def genppl_texts(n_texts: int, words: int) -> tuple[float, int]:
    from bench_genppl import SHAPES, random_judge
    from bitstream.judge import load_judge
    from bitstream.metrics import gen_ppl

    with tempfile.TemporaryDirectory() as tmp:
        random_judge(Path(tmp), **SHAPES["default"])
        scorer = load_judge(tmp, device="cpu")
        rng = np.random.default_rng(0)
        vocab = [f"w{i}" for i in range(1997)]
        texts = [" ".join(rng.choice(vocab, size=int(rng.integers(words // 2, words * 3 // 2))))
                 for _ in range(n_texts)]
        gen_ppl(texts[:8], scorer)  # warm-up
        res = gen_ppl(texts, scorer)
    return res.texts_per_s, res.batch_size


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "config" / "config.yaml"))
    ap.add_argument("--model", default=None, help="model of the config (default: the run's first)")
    ap.add_argument("--run", default="lm1b_web")
    ap.add_argument("--spec", default=None, help="sampler spec whose micro_batch to use (default: the run's first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60, help="timed training steps")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per matmul / sampling measurement")
    ap.add_argument("--texts", type=int, default=512)
    args = ap.parse_args(argv)
    threads = setup_torch(args.threads)
    cfg = yaml.safe_load(Path(args.config).read_text())
    rc = cfg["runs"][args.run]
    model = args.model or rc["models"][0]
    spec = args.spec or rc["specs"][0]

    print(f"machine: {torch.get_num_threads()} torch thread(s) of {torch.multiprocessing.cpu_count()} CPUs, "
          f"torch {torch.__version__}, subnormals flushed: {torch.set_flush_denormal(True)}")
    rate = matmul_rate(args.seconds)
    print(f"fp32 matmul (2048^3):   {rate:8.1f} GFLOP/s")
    ms, gflop, n_params = train_step(cfg, model, args.run, args.steps, threads)
    print(f"training step:          {ms:8.1f} ms  ({gflop:.3f} GFLOP/step -> {gflop / ms * 1e3:.1f} GFLOP/s = "
          f"{gflop / ms * 1e3 / rate:.0%} of the matmul rate)  {model} {n_params:,} params, {args.run} shape, "
          f"batch {cfg['models'][model]['training']['batch_size']}")
    calls, batch, nfe = sampling_calls(cfg, model, args.run, spec, args.seconds)
    print(f"sampling:               {calls:8.1f} network calls/s  (micro-batch {batch}, {calls * batch:.0f} "
          f"sample-evaluations/s, ddim_karras γ=0.2, nfe {nfe})")
    tps, bs = genppl_texts(args.texts, int(rc["seq_len"]))
    print(f"GenPPL:                 {tps:8.1f} texts/s  (random judge of the default shape, batch {bs}, "
          f"{args.texts} texts of ~{rc['seq_len']} tokens)")


if __name__ == "__main__":
    main()
