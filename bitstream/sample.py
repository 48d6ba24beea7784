"""Stage ``sample``: one sampler spec × one seed -> a parquet of samples (spec §8, §9.1).

    python -m bitstream.sample --checkpoint results/{run}/models/{model}/checkpoints/final.pt \\
        --entropy-dir results/{run}/models/{model}/entropy --run-dir results/{run} \\
        --spec '<sampler_spec json | @spec.json | config.yaml:SPEC_NAME>' --seed S \\
        --out results/{run}/samples/{model}/{spec}/seed{S}.parquet [--run R --model M --spec-name NAME]

Loads the model with its EMA weights in eval mode (``bitstream.checkpoint.load_model``), builds the σ
grid and churn window of the spec (``bitstream.samplers.plan_from_spec``), generates ``num_samples``
bit sequences in micro-batches of ``micro_batch`` (every sample with its own noise stream, so the seed
alone decides the samples — spec §14.20 fixed), decodes bits -> ids -> text with
``bitstream.decode.TextDecoder`` and writes one row per sample, atomically.

Per-sample columns: run, model, spec, seed, sample_index, model_ids, base_ids, text, n_invalid.
Generation metadata (constant over the file): the spec knobs (sampler, nfe, gamma, s_noise, window,
window_lo/window_hi in σ units, q_lo, q_hi, s_tmin, s_tmax, sc_mode, eta, terminal_sigma, threshold,
grid, grid_points, sigma_start, sigma_end), ``nfe`` = network calls per sample trajectory as counted,
``network_calls`` = batched network calls made by the job, num_samples, micro_batch, wall_time_s (the
sampling loop only: no model loading, no text decoding), samples_per_s, calls_per_s, device, precision,
torch_version, checkpoint, checkpoint_step, code_version, config_hash (of the spec without its
resources/paper blocks, which do not change samples).

The network runs under bf16 autocast on CUDA with an fp32 sampler state; fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bitstream.io import check_writable, parse_json_arg, provenance, stage_main, write_parquet
from bitstream.progress import Progress
from bitstream.samplers import SampleNoise, SamplerPlan, model_denoiser, plan_from_spec, run_plan, spec_with_defaults


def read_spec(text: str) -> tuple[dict, str | None]:
    """``--spec``: a JSON object, ``@file.json``, or ``config.yaml:SPEC_NAME`` (-> ``sampler_specs[NAME]``).

    Returns the spec with the schema defaults filled in and, for the config form, its name.
    """
    text = text.strip()
    name = None
    if not text.startswith("{") and not text.startswith("@") and ":" in text:
        path, _, name = text.rpartition(":")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--spec {text}: config file {path} not found")
        import yaml

        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        specs = config.get("sampler_specs") or {}
        if name not in specs:
            raise ValueError(f"--spec {text}: {path} has no sampler_specs.{name} "
                             f"(defined: {', '.join(specs) or 'none'})")
        spec, where = specs[name], f"{path}: sampler_specs.{name}"
    else:
        spec, where = parse_json_arg(text, "--spec"), "--spec"
    return spec_with_defaults(spec, where), name


def default_spec_name(spec: dict) -> str:
    return f"{spec['sampler']}_nfe{spec['nfe']}_g{spec['gamma']:g}_{spec['sc_mode']}"


def run_and_model_from_checkpoint(checkpoint: Path) -> tuple[str, str]:
    """``results/{run}/models/{model}/checkpoints/final.pt`` -> (run, model); '?' where the layout differs."""
    parts = checkpoint.resolve().parts
    if len(parts) >= 5 and parts[-2] == "checkpoints" and parts[-4] == "models":
        return parts[-5], parts[-3]
    return "?", "?"


def check_fits_run(meta: dict, run_dir, decoder, checkpoint) -> None:
    """Refuse, before any sampling, a checkpoint that does not fit the run it is decoded in: its bit
    width and sequence length against the run's caches and decoder, and -- for checkpoints that
    record them (``meta["data"]``, written by training) -- the model vocabulary and the tokenizer
    fingerprint (ids of another tokenizer decode to fluent-looking garbage, not to an error)."""
    from bitstream.decode import run_data_identity

    here = run_data_identity(run_dir) or {}
    problems = []
    if int(meta["bits"]) != decoder.bits:
        problems.append(f"bits: checkpoint {meta['bits']}, run {decoder.bits}")
    if "seq_len" in here and int(meta["seq_len"]) != here["seq_len"]:
        problems.append(f"seq_len: checkpoint {meta['seq_len']}, run {here['seq_len']}")
    saved = meta.get("data") or {}
    if "vocab_size" in saved and saved["vocab_size"] != decoder.model_vocab_size:
        problems.append(f"vocab_size: checkpoint {saved['vocab_size']}, run {decoder.model_vocab_size}")
    if saved.get("tokenizer_sha256") and here.get("tokenizer_sha256") \
            and saved["tokenizer_sha256"] != here["tokenizer_sha256"]:
        problems.append(f"tokenizer fingerprint: checkpoint {saved['tokenizer_sha256']}, run "
                        f"{here['tokenizer_sha256']} (trained with another tokenizer)")
    if problems:
        raise ValueError(f"{checkpoint}: checkpoint does not fit run directory {run_dir} ("
                         + "; ".join(problems) + "); sample it in the run it was trained in")


def generate_bits(denoiser, plan: SamplerPlan, num_bits: int, num_samples: int, micro_batch: int, seed: int,
                  device="cpu", first_index: int = 0, progress: Progress | None = None):
    """``num_samples`` bit rows [N, num_bits] (uint8, CPU) of one plan, in micro-batches.

    Sample ``first_index + k`` draws all its noise from its own stream (:class:`SampleNoise`), so the
    rows do not depend on ``micro_batch`` (given a denoiser that treats rows independently). Returns
    ``(bits, stats)`` with stats = {nfe, network_calls, wall_time_s}.
    """
    if num_samples < 1 or micro_batch < 1:
        raise ValueError(f"num_samples and micro_batch must be >= 1, got {num_samples}, {micro_batch}")
    device = torch.device(device)
    rows, calls, nfe = [], 0, None
    t0 = time.monotonic()
    for start in range(first_index, first_index + num_samples, micro_batch):
        indices = range(start, min(start + micro_batch, first_index + num_samples))
        noise = SampleNoise(seed, indices, device)
        latents = noise.randn(num_bits)
        out = run_plan(plan, denoiser, latents, noise.randn_like)
        rows.append(out.bits.cpu())
        calls += out.nfe
        nfe = out.nfe
        if progress is not None:
            elapsed = time.monotonic() - t0
            progress.update(len(indices), calls_per_s=calls / elapsed if elapsed > 0 else 0.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.monotonic() - t0
    return torch.cat(rows).numpy(), {"nfe": nfe, "network_calls": calls, "wall_time_s": wall}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bitstream.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="final.pt of a trained model (EMA weights + config)")
    p.add_argument("--entropy-dir", default=None, help="directory with entropy_{pdf,cdf,sigmas,edges}.pt")
    p.add_argument("--run-dir", required=True, help="results/{run}: tokenizer(s) and cache meta for decoding")
    p.add_argument("--spec", required=True, help="sampler_spec as JSON, @file.json or config.yaml:SPEC_NAME")
    p.add_argument("--seed", type=int, required=True, help="decides the samples (>= 0)")
    p.add_argument("--out", required=True, help="output parquet")
    p.add_argument("--run", default=None, help="run name (default: from the checkpoint path)")
    p.add_argument("--model", default=None, help="model name (default: from the checkpoint path)")
    p.add_argument("--spec-name", default=None, help="spec name (default: the config key or a generated name)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--bits", type=int, default=None, help="the run's bit width (the rule passes runs.<run>.bits; "
                   "default: from the run's cache meta, which an imported model's run need not have)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    return p


@stage_main("sample")
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from bitstream.cpu import setup_torch

    setup_torch(args.threads)  # subnormals flushed; intra-op threads = the job's cpus (issue 12)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint = Path(args.checkpoint)
    try:
        spec, config_name = read_spec(args.spec)
        if args.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: checkpoint not found")
        name = args.spec_name or config_name
        plan = plan_from_spec(spec, entropy_dir=args.entropy_dir, where=f"--spec {name}" if name else "--spec")
        # Decoder first: a missing tokenizer should fail before minutes of sampling, not after.
        from bitstream.checkpoint import load_model
        from bitstream.decode import TextDecoder

        num_samples, micro_batch = int(spec["num_samples"]), int(spec["micro_batch"])
        check_writable(args.out)
        decoder = TextDecoder.from_run_dir(args.run_dir, bits=args.bits)
        model, meta = load_model(str(checkpoint), device=str(device))
        if getattr(getattr(model, "cfg", None), "representation", "bits") != "bits":
            raise ValueError(f"{checkpoint}: a token-space baseline (architecture.representation: tokens); "
                             f"the bit samplers and the bit VLB do not apply to it")
        check_fits_run(meta, args.run_dir, decoder, checkpoint)
        width, seq_len = int(meta["bits"]), int(meta["seq_len"])
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise SystemExit(f"sample: {err}")

    arch = meta.get("architecture", {}) or {}
    denoiser = model_denoiser(model, mode=arch.get("logit_mode", "matched_filter_residual"),
                              clip=float(arch.get("mf_clip", 30.0)))
    torch.manual_seed(args.seed)  # nothing should draw from the global generator; keep it fixed anyway
    run_name, model_name = run_and_model_from_checkpoint(checkpoint)
    spec_name = args.spec_name or config_name or default_spec_name(spec)
    print(f"[sample] {spec_name}: {plan.sampler} N={plan.num_points} σ {plan.sigmas[0]:.4g} -> "
          f"{plan.sigmas[-1]:.4g}, nfe {plan.nfe}, γ {plan.gamma} in σ ∈ [{plan.window_lo:.4g}, "
          f"{plan.window_hi:.4g}], sc {plan.sc_mode}, η {plan.eta}; {num_samples} samples × {seq_len}·{width} "
          f"bits on {device}", file=sys.stderr)

    with Progress(num_samples, f"sample {spec_name} seed{args.seed}", unit="samples") as bar:
        bits, stats = generate_bits(denoiser, plan, seq_len * width, num_samples, micro_batch, args.seed,
                                    device=device, progress=bar)
    t_dec = time.monotonic()
    try:
        batch = decoder.decode_bits(bits)
    except (ValueError, KeyError) as err:
        raise SystemExit(f"sample: decoding {num_samples} samples with {args.run_dir}: {err}")
    decode_s = time.monotonic() - t_dec

    wall = stats["wall_time_s"]
    meta_cols = {
        **plan.metadata(),
        "nfe": stats["nfe"], "network_calls": stats["network_calls"], "s_tmin": float(spec["s_tmin"]),
        "s_tmax": float(spec["s_tmax"]), "num_samples": num_samples, "micro_batch": micro_batch,
        "wall_time_s": wall, "samples_per_s": num_samples / wall if wall > 0 else float("nan"),
        "calls_per_s": stats["network_calls"] / wall if wall > 0 else float("nan"),
        "decode_time_s": decode_s, "device": str(device),
        "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
        "torch_version": torch.__version__, "checkpoint": str(checkpoint),
        "checkpoint_step": int(meta["step"]) if meta.get("step") is not None else -1,
        # self-conditioning "no estimate yet" of these weights (0.5 ours, 0.0 imported upstream weights)
        "sc_absent": float(arch.get("sc_absent", 0.5)), "model_source": meta.get("source", "train"),
        **provenance({k: v for k, v in spec.items() if k not in ("resources", "paper")}),
    }
    import pandas as pd

    df = pd.DataFrame({
        "run": args.run or run_name, "model": args.model or model_name, "spec": spec_name,
        "seed": args.seed, "sample_index": np.arange(num_samples, dtype=np.int64),
        "model_ids": [list(map(int, ids)) for ids in batch.model_ids],
        "base_ids": [list(map(int, ids)) for ids in batch.base_ids],
        "text": list(batch.texts), "n_invalid": np.asarray(batch.n_invalid, dtype=np.int64),
    })
    for key, value in meta_cols.items():
        df[key] = value
    write_parquet(args.out, df)
    print(f"[sample] wrote {args.out}: {num_samples} samples in {wall:.1f}s "
          f"({meta_cols['samples_per_s']:.3g} samples/s, {meta_cols['calls_per_s']:.3g} calls/s, "
          f"nfe {stats['nfe']}), invalid codes {int(np.sum(batch.n_invalid))}", file=sys.stderr)


if __name__ == "__main__":
    main()
