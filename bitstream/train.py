"""Stage ``train``: fit an SDT denoiser on a token cache (spec §2-§5, §7, §13; pseudocode A.1).

    python -m bitstream.train --cache-dir results/{run}/cache --bits B --seq-len L \\
        --params '{"architecture": {...}, "training": {...}, "resources": {...}}' \\
        --out-dir results/{run}/models/{model}
    torchrun --standalone --nproc_per_node N -m bitstream.train ...        # same result, N processes

One optimizer step (spec §13 "Step order", A.1):

1. rows of ``train.u16`` -> bits (``bits.ids_to_bits``, float 0/1) — this rank's slice of the global batch;
2. σ per example: the base sampler (§4.3) mixed with the entropy schedule with probability
   γ(step) = ``schedule.mixing_gamma`` (§4.4), once the tables exist; noise ε; the self-conditioning
   choice (prob ``self_condition_prob``, §7);
3. self-conditioning pass under ``no_grad`` with ``x0_hat = None``; rows not chosen get 0.5, which is
   the model's "absent" (contract convention, spec §7 / §14.9: absent = probability 0.5 everywhere);
4. ``ℓ = denoise_logits(net, x_σ, σ, x̂0)`` (network + matched filter, §3), loss §4.1
   (``binary_sm`` / ``binary_ce``, ``edm`` / ``unit`` weight), backward, grad-norm clip, AdamW
   (β, eps, weight decay on *all* parameters, §13), lr schedule, EMA update;
5. push (σ_b, m_b) of the whole global batch into the entropy buffer (§4.2, §5.2); every
   ``update_every`` steps, once it holds ``num_bins·min_per_bin`` pairs, rebuild the tables (A.2) and
   write them to ``{out}/entropy/``;
6. log / validate (EMA weights) / checkpoint.

Reproducibility and the number of processes. Everything random in a step — σ, the mixing choice,
ε and the self-conditioning choice — is drawn for the *global* batch from one seeded generator that
every rank advances identically; a rank uses its slice. The data order is a seeded permutation per
epoch over a stream of global batches, and rank r takes rows ``[r·b, (r+1)·b)`` of each. DDP averages
the per-rank mean gradients, which is the gradient of the global-batch mean. So 1 process with batch
B and N processes with B/N each take the same steps (to float rounding). Dropout masks come from the
per-rank torch RNG and are the one thing that does depend on the world size (the default models
use dropout 0).

Fixes of upstream quirks (spec §14), each marked where it happens:

* §14.1  σ_d is the configured constant (0.5) on every rank; never re-estimated from data.
* §14.2  ranks do *not* share identical noise for different rows: the global-batch draw is sliced.
* §14.5  the entropy buffer receives the (σ, mse) pairs of the *whole* global batch (all-gathered in
  rank order), and *only training batches* — never validation passes.
* §14.10 the first optimizer step already uses the warm-up lr (``lr·1/warmup``), not the full base lr.
* §14.11 checkpoints load strictly (:mod:`bitstream.checkpoint`).
* §14.18 the validation loss uses one fixed seeded draw of σ (base sampler only), ε and the
  self-conditioning choice, so it is comparable across steps and across the entropy-schedule switch.

Resume: ``checkpoints/last.pt`` (every ``checkpoint_every`` steps) holds model, EMA, optimizer, lr
scheduler, the generators' and torch's RNG states, the data position, the entropy buffer and tables,
the log so far and the config. A run that is killed and restarted ends with exactly the same weights
as one run straight through (tested). ``--stop-after N`` (or SIGTERM, e.g. a SLURM walltime warning)
saves ``last.pt`` and exits without writing the final outputs.

Where things are: the config defaults :mod:`bitstream.train_config`; processes and precision
:mod:`bitstream.distributed`; seeds and the data order :mod:`bitstream.train_data`; AdamW, lr
schedule and EMA :mod:`bitstream.train_optim`; the entropy buffer and tables
:mod:`bitstream.entropy_state`; what ``last.pt`` holds :mod:`bitstream.train_state`; the step (1-5)
and validation :mod:`bitstream.train_step`. This module is the loop that drives them, the final
outputs and the CLI. The data order, optimization, state and loop pieces know nothing of diffusion.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from bitstream import checkpoint as ckpt_io
from bitstream.distributed import Dist, all_gather_cat, all_reduce_sum, make_autocast, setup_distributed, shutdown
from bitstream.entropy_state import EntropyState, uniform_tables
from bitstream.io import parse_json_arg, provenance, write_parquet
from bitstream.progress import Progress
from bitstream.train_config import (ARCHITECTURE_DEFAULTS, ENTROPY_DEFAULTS, RESOURCES_DEFAULTS, SECTIONS,
                                    TRAINING_DEFAULTS, fill_defaults)
from bitstream.train_data import GlobalBatches, data_fingerprint, derive_seed, open_split, rows_to_bits
from bitstream.train_optim import EMA, WarmupCosine, make_optimizer, optimizer_step
from bitstream.train_state import LogInterval, TrainState
from bitstream.train_step import Draw, StepResult, diffusion_loss, draw_batch, train_step, validate

__all__ = [  # the names other modules and tests import from here
    "ARCHITECTURE_DEFAULTS", "ENTROPY_DEFAULTS", "RESOURCES_DEFAULTS", "SECTIONS", "TRAINING_DEFAULTS", "Dist",
    "Draw", "EMA", "EntropyState", "GlobalBatches", "LogInterval", "Run", "StepResult", "TrainState",
    "WarmupCosine", "all_gather_cat", "all_reduce_sum", "data_fingerprint", "derive_seed", "diffusion_loss",
    "draw_batch", "fill_defaults", "main", "make_optimizer", "open_split", "optimizer_step", "rows_to_bits",
    "setup_distributed", "train", "train_step", "uniform_tables", "validate",
]


@dataclass
class Run:
    """The fixed inputs of one training run: config sections, shapes, paths, processes, data."""
    arch: dict
    t: dict
    res: dict
    bits: int
    seq_len: int
    out_dir: Path
    dist: Dist
    threads: int
    train_rows: np.ndarray
    val_rows: np.ndarray
    batches: GlobalBatches
    saved_config: dict          # what last.pt records and a resume must match
    autocast: Callable
    use_bf16: bool
    log: Callable[[str], None]
    t_start: float = 0.0        # monotonic time this job's loop started

    @property
    def n_bits(self) -> int:
        return self.seq_len * self.bits

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def model_cfg(self) -> dict:
        return {k: self.saved_config[k] for k in ("architecture", "training", "bits", "seq_len")}

    def wall_time(self, state: TrainState) -> float:
        return state.wall_before + time.monotonic() - self.t_start


def open_run(cfg: dict, cache_dir: Path, bits: int, seq_len: int, out_dir: Path, dist: Dist,
             stop_after: int | None, log: Callable[[str], None]) -> Run:
    """Check the request, set the thread count, open the data and fix the config a resume must match."""
    arch, t, res = cfg["architecture"], cfg["training"], cfg["resources"]
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = int(t["num_threads"]) or max(1, int(res["cpus"]) // local_world)
    torch.set_num_threads(threads)
    global_batch = int(t["batch_size"])
    if global_batch % dist.world_size:
        raise ValueError(f"training.batch_size {global_batch} is not divisible by the {dist.world_size} "
                         f"processes (the global batch is split evenly over them)")
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {stop_after}")
    train_rows, train_meta = open_split(cache_dir, "train", bits, seq_len)
    val_rows, _ = open_split(cache_dir, "validation", bits, seq_len)
    if len(train_rows) == 0:
        raise ValueError(f"{cache_dir / 'train.u16'}: the training cache holds no rows")
    saved_config = {
        "architecture": arch, "training": t, "resources": res, "bits": int(bits), "seq_len": int(seq_len),
        "data": {"train_rows": int(len(train_rows)), "train_fingerprint": data_fingerprint(cache_dir / "train.u16"),
                 "vocab_size": train_meta.get("vocab_size")},
    }
    autocast, use_bf16 = make_autocast(t["precision"], dist.device)
    return Run(arch, t, res, int(bits), int(seq_len), out_dir, dist, threads, train_rows, val_rows,
               GlobalBatches(len(train_rows), global_batch, int(t["seed"])), saved_config, autocast, use_bf16, log)


def new_state(run: Run) -> TrainState:
    """Step 0: identical initial weights on every rank and world size, seeded generators."""
    t, dist = run.t, run.dist
    torch.manual_seed(int(t["seed"]))
    raw = ckpt_io.build_model(run.arch, run.bits, run.seq_len, t["sigma_data"]).to(dist.device)
    ema = EMA(raw, t["ema_decay"])
    opt = make_optimizer(raw, t)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(t["lr"], t["min_lr"], t["warmup_steps"],
                                                                int(t["steps"])))
    entropy = EntropyState(t["entropy"], t, dist)
    generators = {"sigma": torch.Generator().manual_seed(derive_seed(t["seed"], "sigma")),
                  "noise": torch.Generator(device=dist.device).manual_seed(derive_seed(t["seed"], "noise"))}
    torch.manual_seed(derive_seed(t["seed"], "dropout", dist.rank))
    return TrainState(raw, ema, opt, sched, generators, entropy)


def wrap_for_training(model: torch.nn.Module, t: dict, dist: Dist) -> torch.nn.Module:
    """DDP over the processes (gradient of the global-batch mean) and ``torch.compile`` if configured."""
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None, broadcast_buffers=False)
    if t["compile"]:
        net = torch.compile(net)
    return net


def save_state(run: Run, state: TrainState, path: Path) -> None:
    state.save(path, run.dist, config=run.saved_config, data_position=run.batches.position(state.step),
               provenance=provenance(run.model_cfg), wall_time_s=run.wall_time(state))


# ---------------------------------------------------------------------------------------------------
# The loop


_STOP = {"signal": False}


def _on_sigterm(signum, frame):  # noqa: ARG001
    # Finish the current step, save last.pt, exit (SLURM sends SIGTERM before the walltime kill).
    _STOP["signal"] = True


def run_loop(run: Run, state: TrainState, net: torch.nn.Module, target: int, final_step: int,
             quiet: bool) -> bool:
    """Steps until ``target``: batch, step, global statistics, validate, log, checkpoint. True when a
    SIGTERM stopped it (``last.pt`` saved)."""
    t, dist = run.t, run.dist
    steps = int(t["steps"])
    state.model.train()
    progress = Progress(final_step, "train", unit="step", initial=state.step) if dist.main and not quiet else None
    stopped = False
    while state.step < target:
        t0 = time.monotonic()
        x0 = rows_to_bits(run.train_rows, run.batches.indices(state.step, dist.rank, dist.world_size), run.bits,
                          dist.device)
        r = train_step(state, net, x0, run.arch, t, dist, run.autocast, run.out_dir)
        # The mean loss for the log and the stop flag (all ranks stop at the same step), in one reduction.
        red = torch.tensor([float(r.loss), 1.0 if _STOP["signal"] else 0.0], device=dist.device, dtype=torch.float64)
        all_reduce_sum(red, dist)
        loss_global = float(red[0]) / dist.world_size
        if r.tables_rebuilt and state.entropy.rebuilds == 1:
            buffer = state.entropy.buffer
            run.log(f"entropy tables ready at step {state.step} ({len(buffer) if buffer is not None else '?'} "
                    f"pairs); mixing starts after step {t['entropy']['warmup_steps']}")
        state.interval.add(loss_global, r.grad_norm, r.sigma_global, time.monotonic() - t0)

        step = state.step
        val_loss = float("nan")
        if step % int(t["val_every"]) == 0 or step == steps:
            val_loss = validate(state.ema.model, run.val_rows, run.bits, run.arch, t, dist, run.autocast)
        if step % int(t["log_every"]) == 0 or step % int(t["val_every"]) == 0 or step == steps:
            state.log_rows.append(log_row(run, state, r, val_loss))
            state.interval.reset()
        if progress is not None:
            progress.update(1, loss=loss_global, lr=r.lr, gamma=r.gamma)
        stop_signal = red[1].item() > 0
        if step % int(t["checkpoint_every"]) == 0 or step == target or stop_signal:
            save_state(run, state, run.last_path)
        if int(t["keep_every"]) and step % int(t["keep_every"]) == 0:
            save_state(run, state, run.ckpt_dir / f"step={step:09d}.pt")
        if stop_signal:
            stopped = True
            break
    if progress is not None:
        progress.close()
    return stopped


def log_row(run: Run, state: TrainState, r: StepResult, val_loss: float) -> dict:
    """One row of ``train_log.parquet``: means over the steps since the last row."""
    iv = state.interval
    s = torch.cat(iv.sigmas).double()
    rate = iv.steps / iv.train_time if iv.train_time > 0 else float("nan")
    return {
        "step": state.step, "loss": iv.loss / iv.steps, "val_loss": val_loss, "lr": r.lr,
        "grad_norm": iv.grad_norm / iv.steps, "entropy_gamma": r.gamma,
        "entropy_ready": state.entropy.tables is not None,
        "sigma_median": float(s.median()), "sigma_p10": float(s.quantile(0.1)),
        "sigma_p90": float(s.quantile(0.9)), "log_sigma_mean": float(s.log().mean()),
        "log_sigma_std": float(s.log().std()) if len(s) > 1 else 0.0,
        "wall_time_s": run.wall_time(state),
        "steps_per_s": rate, "bits_per_s": rate * int(run.t["batch_size"]) * run.n_bits,
    }


# ---------------------------------------------------------------------------------------------------
# The training run


def train(cache_dir: str | os.PathLike, bits: int, seq_len: int, params: dict, out_dir: str | os.PathLike,
          device: str | None = None, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Train (or resume) one model; returns a summary dict (rank 0; other ranks get ``{}``).

    ``stop_after``: leave after that many total steps with ``last.pt`` saved and no final outputs
    (simulates a killed job; also lets a long run be split over several jobs).
    """
    cfg = fill_defaults(params)
    previous_handler, handler_installed = None, False
    dist = setup_distributed(device)
    log = (lambda *a: None) if (quiet or not dist.main) else (lambda *a: print("[train]", *a, file=sys.stderr, flush=True))
    try:
        run = open_run(cfg, Path(cache_dir), bits, seq_len, Path(out_dir), dist, stop_after, log)
        t = run.t
        state = new_state(run)
        if run.last_path.exists():
            state.load(run.last_path, dist, config=run.saved_config, seed=int(t["seed"]), log=log)
            log(f"resumed from {run.last_path} at step {state.step}/{int(t['steps'])}")
        else:
            n_params = sum(p.numel() for p in state.model.parameters())
            log(f"start: {n_params:,} parameters, {len(run.train_rows):,} train rows x {seq_len} tokens x {bits} "
                f"bits, global batch {int(t['batch_size'])} over {dist.world_size} process(es) on {dist.device}, "
                f"{'bf16 autocast' if run.use_bf16 else 'fp32'}, {run.threads} thread(s)")
        net = wrap_for_training(state.model, t, dist)

        _STOP["signal"] = False
        try:
            previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
            handler_installed = True
        except ValueError:           # not the main thread (e.g. embedded use): no graceful stop
            pass
        run.t_start = time.monotonic()
        # stop_at_step: finish (final outputs) early on the full-length lr schedule, as the paper's
        # OWT numbers come from step 750K of a 1M-step cosine schedule (spec §12).
        final_step = min(int(t["steps"]), int(t["stop_at_step"] or t["steps"]))
        target = final_step if stop_after is None else min(final_step, stop_after)
        stopped_early = run_loop(run, state, net, target, final_step, quiet)
        if state.step < final_step:
            if stop_after is not None or stopped_early:
                log(f"stopped at step {state.step}/{final_step}; {run.last_path} saved — rerun the same command "
                    f"to continue")
                if stopped_early:
                    raise SystemExit(f"train: stopped by SIGTERM at step {state.step}; resume by rerunning")
                return {"step": state.step, "stopped": True} if dist.main else {}
        return write_final_outputs(run, state) if dist.main else {}
    finally:
        if handler_installed:
            signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)
        shutdown(dist)


def write_final_outputs(run: Run, state: TrainState) -> dict:
    """Rank 0: the entropy tables, ``train_log.parquet`` and the EMA-baked ``final.pt``; the summary."""
    t, log, step = run.t, run.log, state.step
    tables, tables_source = state.entropy.final_tables()
    tables.save(run.out_dir / "entropy")
    log(f"entropy tables: {tables_source} -> {run.out_dir / 'entropy'}")
    prov = provenance(run.model_cfg)
    df = pd.DataFrame(state.log_rows)
    for k, v in prov.items():
        df[k] = v
    write_parquet(run.out_dir / "train_log.parquet", df)
    total_wall = run.wall_time(state)
    n_params = sum(p.numel() for p in state.model.parameters())
    bits_per_step = int(t["batch_size"]) * run.n_bits
    rates = df["steps_per_s"].replace([np.inf], np.nan).dropna()
    summary = {
        "step": step, "n_params": n_params, "wall_time_s": total_wall,
        "steps_per_s": float(rates.median()) if len(rates) else float("nan"),
        "bits_per_s": float(rates.median() * bits_per_step) if len(rates) else float("nan"),
        "steps_per_s_overall": step / total_wall if total_wall > 0 else float("nan"),   # incl. validation, checkpoints
        "loss_first": float(df["loss"].iloc[0]) if len(df) else float("nan"),
        "loss_last": float(df["loss"].iloc[-1]) if len(df) else float("nan"),
        "val_loss_last": float(df["val_loss"].dropna().iloc[-1]) if df["val_loss"].notna().any() else float("nan"),
        "entropy_ready_step": state.entropy.ready_step, "entropy_first_gamma_step": state.first_gamma_step,
        "entropy_tables": tables_source,
    }
    meta = {
        "architecture": run.arch, "training": t, "bits": run.bits, "seq_len": run.seq_len, "step": step,
        "sigma_data": float(t["sigma_data"]), "n_params": n_params, "world_size": run.dist.world_size,
        "data": run.saved_config["data"], "summary": summary, **prov, "provenance": prov,
    }
    ckpt_io.save(run.ckpt_dir / "final.pt", {"format": ckpt_io.MODEL_FORMAT, "model": state.ema.state_dict()["shadow"],
                                             "meta": meta})
    log(f"done: {step} steps in {total_wall:.1f}s ({summary['steps_per_s']:.3g} steps/s, "
        f"{summary['bits_per_s']:.3g} bits/s); loss {summary['loss_first']:.4g} -> {summary['loss_last']:.4g}, "
        f"val (EMA) {summary['val_loss_last']:.4g}; entropy tables ready at step {state.entropy.ready_step}, "
        f"first used at step {state.first_gamma_step} -> {run.ckpt_dir / 'final.pt'}")
    return summary


# ---------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", required=True, help="results/{run}/cache (train.u16, validation.u16 + meta)")
    ap.add_argument("--bits", type=int, required=True, help="bits per token (the run's 'bits')")
    ap.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (the run's 'seq_len')")
    ap.add_argument("--params", required=True, help="JSON {architecture, training, resources} (or @file.json)")
    ap.add_argument("--out-dir", required=True, help="results/{run}/models/{model}")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="save checkpoints/last.pt and leave after this many total steps (resume later)")
    args = ap.parse_args(argv)
    params = parse_json_arg(args.params)
    try:
        train(args.cache_dir, args.bits, args.seq_len, params, args.out_dir, device=args.device,
              stop_after=args.stop_after)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"train: {err}")


if __name__ == "__main__":
    main()
