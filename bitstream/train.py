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
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist

from bitstream import checkpoint as ckpt_io
from bitstream.bits import check_width, ids_to_bits
from bitstream.io import parse_json_arg, provenance, write_parquet
from bitstream.progress import Progress

# ---------------------------------------------------------------------------------------------------
# Config: the schema's defaults (workflow/schemas/config.schema.yaml, $defs training / entropy /
# architecture / resources). Snakemake fills them already; they are repeated here so the stage also
# runs from a hand-written --params, and a test checks that both agree.

ENTROPY_DEFAULTS: dict[str, Any] = {
    "enabled": True, "buffer_size": 800000, "num_bins": 128, "min_per_bin": 100, "update_every": 2000,
    "warmup_steps": 40000, "transition_steps": 10000, "gamma_max": 1.0, "target": "sqrt-rate",
    "reg_c": 0.1, "reg_n": 3.0, "floor": 0.0,
}
TRAINING_DEFAULTS: dict[str, Any] = {
    "steps": 1000000, "batch_size": 512, "lr": 3.0e-4, "min_lr": 1.0e-6, "warmup_steps": 2500,
    "weight_decay": 0.01, "betas": [0.9, 0.99], "eps": 1.0e-8, "grad_clip": 1.0, "ema_decay": 0.9999,
    "loss": "binary_sm", "weighting": "edm", "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0,
    "sigma_sampler": "log_normal", "p_mean": -1.2, "p_std": 1.2, "self_condition_prob": 0.5,
    "entropy": ENTROPY_DEFAULTS, "checkpoint_every": 5000, "keep_every": 50000, "log_every": 100,
    "val_every": 5000, "val_batches": 20, "seed": 42, "precision": "auto", "compile": False,
    "num_threads": 0, "stop_at_step": None,
}
ARCHITECTURE_DEFAULTS: dict[str, Any] = {
    "embed_dim": 768, "n_blocks": 12, "n_heads": 12, "dim_ff": 3072, "content_dim": 64, "head_hidden": 128,
    "dropout": 0.1, "rope_base": 10000.0, "self_condition": True, "logit_mode": "matched_filter_residual",
    "mf_clip": 30.0, "attention": "sdpa",
}
RESOURCES_DEFAULTS: dict[str, Any] = {
    "gpus": 0, "gpu_model": None, "cpus": 1, "mem_mb": 4000, "runtime": 60, "slurm_partition": None,
    "slurm_account": None, "slurm_extra": None,
}
SECTIONS = {"architecture": ARCHITECTURE_DEFAULTS, "training": TRAINING_DEFAULTS, "resources": RESOURCES_DEFAULTS}


def _fill(section: dict, defaults: dict, where: str) -> dict:
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(defaults)}")
    out = {}
    for key, default in defaults.items():
        value = section.get(key, default)
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key}: expected a mapping, got {value!r}")
            value = _fill(value, default, f"{where}.{key}")
        out[key] = value
    return out


def fill_defaults(params: dict) -> dict:
    """``{architecture, training, resources}`` with every schema default filled in; unknown keys refused."""
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--params: unknown section(s) {', '.join(unknown)}; expected {', '.join(SECTIONS)}")
    cfg = {name: _fill(params.get(name) or {}, defaults, name) for name, defaults in SECTIONS.items()}
    t = cfg["training"]
    if t["sigma_data"] != 0.5:
        # §14.1: sampling and evaluation assume σ_d = 0.5 (diffusion.SIGMA_DATA); a different training
        # σ_d would silently train a model that every later stage evaluates with the wrong c_in.
        raise ValueError(f"training.sigma_data: only 0.5 is supported (spec §14.1), got {t['sigma_data']}")
    if not 0 < t["sigma_min"] < t["sigma_max"]:
        raise ValueError(f"training.sigma_min/sigma_max: need 0 < sigma_min < sigma_max, got "
                         f"{t['sigma_min']}, {t['sigma_max']}")
    return cfg


# ---------------------------------------------------------------------------------------------------
# Seeds: one integer seed, independent named streams


_STREAMS = {"data": 1, "sigma": 2, "noise": 3, "dropout": 4, "validation": 5}


def derive_seed(seed: int, stream: str, *more: int) -> int:
    """A 63-bit seed for the named stream (``numpy.random.SeedSequence`` mixing, no overlap)."""
    words = [int(seed) % 2**64, _STREAMS[stream], *[int(m) for m in more]]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> Dist:
    """Read torchrun's environment; NCCL on CUDA, gloo on CPU. One process = rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, dev)


def all_gather_cat(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Concatenate every rank's equally shaped ``t`` in rank order (== the single-process global batch)."""
    if not dist.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        torch_dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------------
# Data


def data_fingerprint(path: Path, chunks: int = 16, chunk_bytes: int = 1 << 16) -> str:
    """Cheap content fingerprint of a (possibly huge) cache file: its size and 16 evenly spaced chunks.

    Stored with the config so that a resumed run refuses a cache that was rebuilt meanwhile.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for k in range(chunks):
            f.seek((size - chunk_bytes) * k // max(chunks - 1, 1) if size > chunk_bytes else 0)
            h.update(f.read(chunk_bytes))
    return h.hexdigest()[:16]


def open_split(cache_dir: Path, split: str, bits: int, seq_len: int) -> tuple[np.ndarray, dict]:
    """Rows ``[N, seq_len]`` of ``{cache_dir}/{split}.u16`` after checking the meta against the run."""
    from bitstream.token_cache import load_cache

    prefix = cache_dir / split
    rows, meta = load_cache(prefix, expect={"seq_len": seq_len})
    if meta.get("vocab_size") is not None:
        check_width(int(meta["vocab_size"]), bits, where=f"{prefix}.meta.json vocab_size vs --bits {bits}")
    return rows, meta


class GlobalBatches:
    """The deterministic data order: a stream of seeded per-epoch permutations cut into global batches.

    Global batch ``k`` holds stream positions ``[k·B, (k+1)·B)``; position ``p`` is row
    ``perm_e[p mod N]`` of epoch ``e = p div N``, with ``perm_e`` a permutation seeded by
    ``(seed, e)``. Rank ``r`` of ``W`` takes positions ``[k·B + r·B/W, k·B + (r+1)·B/W)``. The order is a
    function of the step alone, so resuming needs only the step, and it does not depend on ``W``.
    """

    def __init__(self, n_rows: int, global_batch: int, seed: int):
        if n_rows < 1:
            raise ValueError("no training rows")
        self.n, self.global_batch, self.seed = n_rows, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng(derive_seed(self.seed, "data", epoch))
            self._perms[epoch] = rng.permutation(self.n)
        return self._perms[epoch]

    def position(self, step: int) -> dict:
        p = step * self.global_batch
        return {"step": step, "stream_position": p, "epoch": p // self.n, "index_in_epoch": p % self.n}

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        b = self.global_batch // world_size
        pos = step * self.global_batch + rank * b + np.arange(b, dtype=np.int64)
        epochs = pos // self.n
        out = np.empty(b, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.perm(int(e))[pos[sel] % self.n]
        return out


def rows_to_bits(rows: np.ndarray, idx: np.ndarray, bits: int, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` of a uint16 memmap -> float32 0/1 bits ``[b, L·bits]`` on ``device`` (spec §1.2)."""
    order = np.argsort(idx, kind="stable")               # read the memmap in file order
    ids = np.empty((len(idx), rows.shape[1]), dtype=np.int64)
    ids[order] = rows[idx[order]]
    return torch.from_numpy(ids_to_bits(ids, bits)).to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# Learning rate, EMA


class WarmupCosine:
    """lr multiplier for ``LambdaLR``: linear warm-up, then cosine to ``min_lr`` at ``total`` (spec §13).

    ``LambdaLR`` evaluates the multiplier at ``k`` = optimizer steps already taken. Step ``k+1`` runs at
    ``lr·(k+1)/warmup`` during warm-up — so the very first step already uses the warm-up lr (fix of spec
    §14.10, where the first step ran at the full base lr) — and then at
    ``min_lr + ½(lr − min_lr)(1 + cos(π·(k+1−warmup)/(total−warmup)))``, reaching ``min_lr`` at the
    last step.
    """

    def __init__(self, lr: float, min_lr: float, warmup: int, total: int):
        self.lr, self.min_lr, self.warmup, self.total = float(lr), float(min_lr), int(warmup), int(total)

    def lr_at(self, k: int) -> float:
        t = k + 1
        if t <= self.warmup:
            return self.lr * t / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((t - self.warmup) / span, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def __call__(self, k: int) -> float:
        return self.lr_at(k) / self.lr


class EMA:
    """Exponential moving average of the weights (spec §13): the shadow starts as a copy of the initial
    weights and is updated after every optimizer step, ``θ̄ ← d·θ̄ + (1 − d)·θ``."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": ckpt_io.clean_state_dict(self.model.state_dict())}

    def load_state_dict(self, state: dict, where: str) -> None:
        ckpt_io.load_state_dict_strict(self.model, state["shadow"], f"{where} (EMA)")


def make_optimizer(model: torch.nn.Module, t: dict) -> torch.optim.AdamW:
    """AdamW with the config's β, eps and weight decay on *all* parameters, as upstream (spec §13).

    The fused kernel (CPU and CUDA) when available: ~3x faster optimizer step on the tiny CPU model and
    deterministic; the same kernel is used after a resume, so resumed runs stay exact.
    """
    kwargs = dict(lr=float(t["lr"]), betas=tuple(float(b) for b in t["betas"]), eps=float(t["eps"]),
                  weight_decay=float(t["weight_decay"]))
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(model.parameters(), **kwargs)


# ---------------------------------------------------------------------------------------------------
# One step's randomness and loss


@dataclass
class Draw:
    """This rank's slice of one global batch's random choices."""
    sigma: torch.Tensor          # [b] on device
    noise: torch.Tensor          # [b, S] on device
    sc: torch.Tensor | None      # [b] bool on device, or None when self-conditioning is off
    sigma_global: torch.Tensor   # [B] on CPU (for the log)


def draw_batch(global_batch: int, n_bits: int, t: dict, self_condition: bool, gen: torch.Generator,
               noise_gen: torch.Generator, schedule, step: int, dist: Dist) -> Draw:
    """σ, ε and the self-conditioning choice for the *global* batch, identical on every rank; keep this
    rank's slice (spec §14.2: rows on different ranks get different noise).

    σ: the base sampler (§4.3), replaced per example with probability γ(step) by a draw from the
    entropy tables ``schedule`` (§4.4, ``schedule.draw_training_sigma``); ``schedule=None`` = base only.
    A fraction ``entropy.floor`` of the table draws is log-uniform over [σ_min, σ_max] instead (the
    dead-bin guard of ``bitstream.schedule``; 0 = paper).
    """
    from bitstream.schedule import draw_training_sigma

    sigma = draw_training_sigma(global_batch, step, t, schedule, gen, floor=float(t["entropy"]["floor"]),
                                device="cpu")
    sc = None
    if self_condition and t["self_condition_prob"] > 0:
        sc = torch.rand(global_batch, generator=gen) < t["self_condition_prob"]
    noise = torch.randn(global_batch, n_bits, generator=noise_gen, device=noise_gen.device)
    b = global_batch // dist.world_size
    sl = slice(dist.rank * b, (dist.rank + 1) * b)
    dev = dist.device
    return Draw(sigma[sl].to(dev), noise[sl].to(dev), None if sc is None else sc[sl].to(dev), sigma)


def diffusion_loss(net, sc_net, x0: torch.Tensor, d: Draw, arch: dict, t: dict, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (spec §4.1) and per-example MSE m_b (§4.2) of one batch, with self-conditioning (§7, A.1).

    ``net`` is the (DDP / compiled) model that gets gradients; ``sc_net`` is the plain module for the
    no-grad self-conditioning pass (no DDP collectives inside a pass that only some rows need).
    The SC estimate is made with ``x0_hat = None``; rows not chosen get 0.5 = "absent" (contract
    convention, spec §7 / §14.9), so the model always sees one encoding of "no estimate".
    """
    from bitstream.diffusion import LOSSES, add_noise, denoise_logits, per_example_mse

    mode, clip = arch["logit_mode"], float(arch["mf_clip"])
    x = add_noise(x0, d.sigma, d.noise)
    x0_hat = None
    if d.sc is not None:
        x0_hat = torch.full_like(x, 0.5)
        if bool(d.sc.any()):
            with torch.no_grad(), autocast():
                logits_sc = denoise_logits(sc_net, x[d.sc], d.sigma[d.sc], None, mode=mode, clip=clip)
            x0_hat[d.sc] = torch.sigmoid(logits_sc.float())
    with autocast():
        logits = denoise_logits(net, x, d.sigma, x0_hat, mode=mode, clip=clip)
    loss = LOSSES[t["loss"]](logits.float(), x0, d.sigma, weighting=t["weighting"], sigma_data=t["sigma_data"])
    mse = per_example_mse(torch.sigmoid(logits.float()), x0)
    return loss, mse


# ---------------------------------------------------------------------------------------------------
# Entropy schedule state (spec §5.2)


class EntropyState:
    """The FIFO of (σ, m) pairs, the current tables, and when they switched on.

    Only rank 0 keeps the buffer and rebuilds; the tables are broadcast so every rank draws σ from the
    same histogram (spec §5.7: rank 0 decides). Since the buffer holds the whole global batch (fix of
    §14.5), its content does not depend on the world size.
    """

    def __init__(self, e: dict, t: dict, dist: Dist):
        from bitstream.schedule import EntropyBuffer

        self.cfg, self.t, self.dist = e, t, dist
        self.buffer = EntropyBuffer(int(e["buffer_size"])) if dist.main else None
        self.tables = None                  # EntropySchedule once ready
        self.ready_step: int | None = None  # first rebuild
        self.rebuilds = 0

    def gamma(self, step: int) -> float:
        """Mixing γ actually in force at ``step`` (0 until the tables exist or when disabled)."""
        from bitstream.schedule import mixing_gamma

        if not self.cfg["enabled"] or self.tables is None:
            return 0.0
        return float(mixing_gamma(step, int(self.cfg["warmup_steps"]), int(self.cfg["transition_steps"]),
                                  float(self.cfg["gamma_max"])))

    def push(self, sigma: torch.Tensor, mse: torch.Tensor) -> None:
        if self.buffer is not None:
            self.buffer.push(sigma.detach().float().cpu(), mse.detach().float().cpu())

    def _rebuild(self):
        from bitstream.schedule import rebuild_entropy_tables

        e, t = self.cfg, self.t
        sigmas, mse = self.buffer.data()
        return rebuild_entropy_tables(sigmas, mse, num_bins=int(e["num_bins"]),
                                      sigma_min=float(t["sigma_min"]), sigma_max=float(t["sigma_max"]),
                                      c=float(e["reg_c"]), n=float(e["reg_n"]), target=e["target"])

    def maybe_rebuild(self, step: int, out_dir: Path) -> bool:
        """Every ``update_every`` steps once the buffer holds ``num_bins·min_per_bin`` pairs (spec §5.2)."""
        e = self.cfg
        if not e["enabled"] or step % int(e["update_every"]):
            return False
        need = int(e["num_bins"]) * int(e["min_per_bin"])
        flag = torch.zeros(1, device=self.dist.device)
        if self.dist.main and len(self.buffer) >= need:
            flag += 1
            self.tables = self._rebuild()
        all_reduce_sum(flag, self.dist)
        if flag.item() == 0:
            return False
        self._broadcast()
        if self.ready_step is None:
            self.ready_step = step
        self.rebuilds += 1
        if self.dist.main:
            self.tables.save(out_dir / "entropy")
        return True

    def _broadcast(self) -> None:
        if not self.dist.enabled:
            return
        from bitstream.schedule import EntropySchedule

        k = int(self.cfg["num_bins"])
        shapes = {"pdf": k, "cdf": k, "sigmas": k, "edges": k + 1}
        out = {}
        for name, n in shapes.items():
            buf = (getattr(self.tables, name).to(self.dist.device, torch.float64) if self.dist.main
                   else torch.empty(n, dtype=torch.float64, device=self.dist.device))
            torch_dist.broadcast(buf, src=0)
            out[name] = buf.cpu()
        dtype = getattr(self.tables, "pdf").dtype if self.dist.main else torch.float32
        self.tables = EntropySchedule(**{k_: v.to(dtype) for k_, v in out.items()})

    def final_tables(self):
        """Tables to ship: the current ones; else built from the buffer now; else uniform (rank 0)."""
        if self.tables is not None:
            return self.tables, "trained (last rebuild)"
        if self.buffer is not None and len(self.buffer) > 0:
            return self._rebuild(), f"built at the end from {len(self.buffer)} buffered pairs (schedule never switched on)"
        return uniform_tables(int(self.cfg["num_bins"]), float(self.t["sigma_min"]), float(self.t["sigma_max"])), \
            "uniform (empty buffer)"

    def state_dict(self) -> dict:
        tables = None
        if self.tables is not None:
            tables = {k: getattr(self.tables, k).detach().cpu() for k in ("pdf", "cdf", "sigmas", "edges")}
        return {"buffer": None if self.buffer is None else self.buffer.state_dict(), "tables": tables,
                "ready_step": self.ready_step, "rebuilds": self.rebuilds}

    def load_state_dict(self, state: dict) -> None:
        from bitstream.schedule import EntropySchedule

        if self.buffer is not None and state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
        self.tables = None if state["tables"] is None else EntropySchedule(**state["tables"])
        self.ready_step, self.rebuilds = state["ready_step"], int(state["rebuilds"])


def uniform_tables(num_bins: int, sigma_min: float, sigma_max: float):
    """Uniform pdf over log-spaced bins (the format of spec §5.3) — for a run whose buffer stayed empty."""
    from bitstream.schedule import EntropySchedule

    log_edges = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_bins + 1, dtype=torch.float64)
    pdf = torch.full((num_bins,), 1.0 / num_bins, dtype=torch.float64)
    cdf = torch.cumsum(pdf, 0)
    cdf[-1] = 1.0
    return EntropySchedule(pdf=pdf.float(), cdf=cdf.float(), sigmas=((log_edges[:-1] + log_edges[1:]) / 2).exp().float(),
                           edges=log_edges.exp().float())


# ---------------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(ema_model: torch.nn.Module, rows: np.ndarray, bits: int, arch: dict, t: dict, dist: Dist,
             autocast) -> float:
    """Mean loss of the EMA model over ``val_batches`` fixed global batches of the validation split.

    The σ (base sampler only), ε and self-conditioning choices come from a generator re-seeded each
    time, so the number is comparable across steps — also across the entropy-schedule switch, unlike
    upstream, whose validation used the current training σ distribution (spec §14.18). Validation
    pairs never enter the entropy buffer (fix of §14.5).
    """
    n_val, global_batch = len(rows), int(t["batch_size"])
    if n_val == 0:
        return float("nan")
    seed = derive_seed(t["seed"], "validation")
    gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=dist.device).manual_seed(seed)
    b = global_batch // dist.world_size
    total = torch.zeros(1, device=dist.device, dtype=torch.float64)
    for k in range(int(t["val_batches"])):
        idx = (k * global_batch + dist.rank * b + np.arange(b)) % n_val
        x0 = rows_to_bits(rows, idx, bits, dist.device)
        d = draw_batch(global_batch, x0.shape[1], t, arch["self_condition"], gen, noise_gen, None, 0, dist)
        loss, _ = diffusion_loss(ema_model, ema_model, x0, d, arch, t, autocast)
        total += loss.double()
    all_reduce_sum(total, dist)
    return float(total.item()) / (dist.world_size * int(t["val_batches"]))


# ---------------------------------------------------------------------------------------------------
# The training run


class _Interval:
    """Accumulates the steps between two log rows (saved in last.pt so a resumed log is identical)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.steps, self.loss, self.grad_norm, self.train_time = 0, 0.0, 0.0, 0.0
        self.sigmas: list[torch.Tensor] = []

    def state_dict(self) -> dict:
        return {"steps": self.steps, "loss": self.loss, "grad_norm": self.grad_norm, "train_time": self.train_time,
                "sigmas": torch.cat(self.sigmas) if self.sigmas else torch.zeros(0)}

    def load_state_dict(self, s: dict) -> None:
        self.steps, self.loss, self.grad_norm, self.train_time = int(s["steps"]), float(s["loss"]), \
            float(s["grad_norm"]), float(s["train_time"])
        self.sigmas = [s["sigmas"]] if len(s["sigmas"]) else []


_STOP = {"signal": False}


def _on_sigterm(signum, frame):  # noqa: ARG001
    # Finish the current step, save last.pt, exit (SLURM sends SIGTERM before the walltime kill).
    _STOP["signal"] = True


def train(cache_dir: str | os.PathLike, bits: int, seq_len: int, params: dict, out_dir: str | os.PathLike,
          device: str | None = None, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Train (or resume) one model; returns a summary dict (rank 0; other ranks get ``{}``).

    ``stop_after``: leave after that many total steps with ``last.pt`` saved and no final outputs
    (simulates a killed job; also lets a long run be split over several jobs).
    """
    cfg = fill_defaults(params)
    arch, t, res = cfg["architecture"], cfg["training"], cfg["resources"]
    e = t["entropy"]
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    last_path = ckpt_dir / "last.pt"

    previous_handler, handler_installed = None, False
    dist = setup_distributed(device)
    log = (lambda *a: None) if (quiet or not dist.main) else (lambda *a: print("[train]", *a, file=sys.stderr, flush=True))
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = int(t["num_threads"]) or max(1, int(res["cpus"]) // local_world)
        torch.set_num_threads(threads)
        global_batch, steps = int(t["batch_size"]), int(t["steps"])
        if global_batch % dist.world_size:
            raise ValueError(f"training.batch_size {global_batch} is not divisible by the {dist.world_size} "
                             f"processes (the global batch is split evenly over them)")
        if stop_after is not None and stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {stop_after}")

        # ---- data
        train_rows, train_meta = open_split(cache_dir, "train", bits, seq_len)
        val_rows, _ = open_split(cache_dir, "validation", bits, seq_len)
        if len(train_rows) == 0:
            raise ValueError(f"{cache_dir / 'train.u16'}: the training cache holds no rows")
        n_bits = seq_len * bits
        batches = GlobalBatches(len(train_rows), global_batch, int(t["seed"]))
        saved_config = {
            "architecture": arch, "training": t, "resources": res, "bits": int(bits), "seq_len": int(seq_len),
            "data": {"train_rows": int(len(train_rows)), "train_fingerprint": data_fingerprint(cache_dir / "train.u16"),
                     "vocab_size": train_meta.get("vocab_size")},
        }
        model_cfg = {k: saved_config[k] for k in ("architecture", "training", "bits", "seq_len")}

        # ---- precision
        use_bf16 = t["precision"] == "bf16" or (t["precision"] == "auto" and dist.device.type == "cuda")

        def autocast():
            if not use_bf16:
                return nullcontext()
            return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16)

        if dist.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True   # spec §13: TF32 on
            torch.backends.cudnn.allow_tf32 = True

        # ---- model, EMA, optimizer, schedule (identical initial weights on every rank and world size)
        torch.manual_seed(int(t["seed"]))
        raw = ckpt_io.build_model(arch, bits, seq_len, t["sigma_data"]).to(dist.device)
        ema = EMA(raw, t["ema_decay"])
        n_params = sum(p.numel() for p in raw.parameters())
        # Weight decay on *all* parameters, as upstream (spec §13).
        opt = make_optimizer(raw, t)
        lr_fn = WarmupCosine(t["lr"], t["min_lr"], t["warmup_steps"], steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
        entropy = EntropyState(e, t, dist)
        gen = torch.Generator().manual_seed(derive_seed(t["seed"], "sigma"))
        noise_gen = torch.Generator(device=dist.device).manual_seed(derive_seed(t["seed"], "noise"))
        torch.manual_seed(derive_seed(t["seed"], "dropout", dist.rank))
        interval = _Interval()
        log_rows: list[dict] = []
        step, wall_before, first_gamma_step = 0, 0.0, None

        # ---- resume
        if last_path.exists():
            state = ckpt_io.load(last_path, map_location="cpu")
            if state["format"] != ckpt_io.TRAIN_STATE_FORMAT:
                raise ValueError(f"{last_path}: not a training state (format {state['format']!r})")
            ckpt_io.check_config(state["config"], saved_config, last_path, ignore=ckpt_io.resume_ignore(),
                                 hint=f"Delete {last_path} to start this model from scratch, or choose "
                                      f"another --out-dir")
            ckpt_io.load_state_dict_strict(raw, state["model"], str(last_path))
            ema.load_state_dict(state["ema"], str(last_path))
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            entropy.load_state_dict(state["entropy"])
            rng = state["rng"]
            gen.set_state(rng["sigma"])
            noise_gen.set_state(rng["noise"])
            if len(rng["torch"]) == dist.world_size:
                torch.set_rng_state(rng["torch"][dist.rank])
                if dist.device.type == "cuda" and rng.get("cuda"):
                    torch.cuda.set_rng_state(rng["cuda"][dist.rank], dist.device)
            else:
                # Only dropout masks use torch's RNG; they cannot be carried over to a different number
                # of processes. Reseeded per rank and step; noted in the log.
                torch.manual_seed(derive_seed(t["seed"], "dropout", dist.rank, int(state["step"])))
                log(f"resuming with {dist.world_size} processes (saved with {len(rng['torch'])}): "
                    f"dropout RNG reseeded")
            interval.load_state_dict(state["interval"])
            log_rows = list(state["log"])
            step, wall_before = int(state["step"]), float(state["wall_time_s"])
            first_gamma_step = state.get("first_gamma_step")
            log(f"resumed from {last_path} at step {step}/{steps}")
            del state
        else:
            log(f"start: {n_params:,} parameters, {len(train_rows):,} train rows x {seq_len} tokens x {bits} bits, "
                f"global batch {global_batch} over {dist.world_size} process(es) on {dist.device}, "
                f"{'bf16 autocast' if use_bf16 else 'fp32'}, {threads} thread(s)")

        # ---- wrappers
        net: torch.nn.Module = raw
        if dist.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                raw, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                broadcast_buffers=False)
        if t["compile"]:
            net = torch.compile(net)

        # ---- checkpointing
        def save_state(path: Path) -> None:
            rng_torch = [torch.get_rng_state()]
            rng_cuda = [torch.cuda.get_rng_state(dist.device)] if dist.device.type == "cuda" else []
            if dist.enabled:
                gathered = [None] * dist.world_size
                torch_dist.all_gather_object(gathered, (rng_torch[0], rng_cuda[0] if rng_cuda else None))
                rng_torch = [g[0] for g in gathered]
                rng_cuda = [g[1] for g in gathered] if rng_cuda else []
            if not dist.main:
                return
            ckpt_io.save(path, {
                "format": ckpt_io.TRAIN_STATE_FORMAT, "step": step, "config": saved_config,
                "model": ckpt_io.clean_state_dict(raw.state_dict()), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": {"torch": rng_torch, "cuda": rng_cuda, "sigma": gen.get_state(), "noise": noise_gen.get_state()},
                "data": batches.position(step), "entropy": entropy.state_dict(), "interval": interval.state_dict(),
                "log": log_rows, "wall_time_s": wall_before + (time.monotonic() - t_start),
                "first_gamma_step": first_gamma_step, "world_size": dist.world_size,
                "provenance": provenance(model_cfg),
            })

        # ---- loop
        _STOP["signal"] = False
        try:
            previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
            handler_installed = True
        except ValueError:           # not the main thread (e.g. embedded use): no graceful stop
            pass
        bits_per_step = global_batch * n_bits
        t_start = time.monotonic()
        # stop_at_step: finish (final outputs) early on the full-length lr schedule, as the paper's
        # OWT numbers come from step 750K of a 1M-step cosine schedule (spec §12).
        final_step = min(steps, int(t["stop_at_step"] or steps))
        target = final_step if stop_after is None else min(final_step, stop_after)
        raw.train()
        progress = Progress(final_step, "train", unit="step", initial=step) if dist.main and not quiet else None
        stopped_early = False
        while step < target:
            t0 = time.monotonic()
            gamma = entropy.gamma(step)
            if gamma > 0 and first_gamma_step is None:
                first_gamma_step = step + 1          # 1-based number of the first step using the tables
            idx = batches.indices(step, dist.rank, dist.world_size)
            x0 = rows_to_bits(train_rows, idx, bits, dist.device)
            d = draw_batch(global_batch, n_bits, t, arch["self_condition"], gen, noise_gen,
                           entropy.tables if e["enabled"] else None, step, dist)
            lr_now = sched.get_last_lr()[0]
            opt.zero_grad(set_to_none=True)
            loss, mse = diffusion_loss(net, raw, x0, d, arch, t, autocast)
            if loss.requires_grad:
                loss.backward()
                max_norm = float(t["grad_clip"]) if t["grad_clip"] > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(raw.parameters(), max_norm))
                opt.step()
            else:                       # logit_mode matched_filter_only: nothing to learn
                grad_norm = 0.0
            sched.step()
            ema.update(raw)
            step += 1

            # Global statistics: (σ, m) of the whole global batch for the buffer (fix §14.5), the mean
            # loss for the log, and the stop flag (all ranks stop at the same step).
            pairs = all_gather_cat(torch.stack([d.sigma.float(), mse.float()], 1), dist)
            red = torch.tensor([float(loss.detach()), 1.0 if _STOP["signal"] else 0.0], device=dist.device,
                               dtype=torch.float64)
            all_reduce_sum(red, dist)
            loss_global = float(red[0]) / dist.world_size
            entropy.push(pairs[:, 0], pairs[:, 1])
            rebuilt = entropy.maybe_rebuild(step, out_dir)
            if rebuilt and entropy.rebuilds == 1:
                log(f"entropy tables ready at step {step} ({len(entropy.buffer) if entropy.buffer is not None else '?'} "
                    f"pairs); mixing starts after step {e['warmup_steps']}")
            interval.steps += 1
            interval.loss += loss_global
            interval.grad_norm += grad_norm
            interval.sigmas.append(d.sigma_global)
            interval.train_time += time.monotonic() - t0

            val_loss = float("nan")
            if step % int(t["val_every"]) == 0 or step == steps:
                val_loss = validate(ema.model, val_rows, bits, arch, t, dist, autocast)
            if step % int(t["log_every"]) == 0 or step % int(t["val_every"]) == 0 or step == steps:
                s = torch.cat(interval.sigmas).double()
                rate = interval.steps / interval.train_time if interval.train_time > 0 else float("nan")
                log_rows.append({
                    "step": step, "loss": interval.loss / interval.steps, "val_loss": val_loss, "lr": lr_now,
                    "grad_norm": interval.grad_norm / interval.steps, "entropy_gamma": gamma,
                    "entropy_ready": entropy.tables is not None,
                    "sigma_median": float(s.median()), "sigma_p10": float(s.quantile(0.1)),
                    "sigma_p90": float(s.quantile(0.9)), "log_sigma_mean": float(s.log().mean()),
                    "log_sigma_std": float(s.log().std()) if len(s) > 1 else 0.0,
                    "wall_time_s": wall_before + time.monotonic() - t_start,
                    "steps_per_s": rate, "bits_per_s": rate * bits_per_step,
                })
                interval.reset()
            if progress is not None:
                progress.update(1, loss=loss_global, lr=lr_now, gamma=gamma)
            stop_signal = red[1].item() > 0
            if step % int(t["checkpoint_every"]) == 0 or step == target or stop_signal:
                save_state(last_path)
            if int(t["keep_every"]) and step % int(t["keep_every"]) == 0:
                save_state(ckpt_dir / f"step={step:09d}.pt")
            if stop_signal:
                stopped_early = True
                break
        if progress is not None:
            progress.close()
        if step < final_step:
            if stop_after is not None or stopped_early:
                log(f"stopped at step {step}/{final_step}; {last_path} saved — rerun the same command to continue")
                if stopped_early:
                    raise SystemExit(f"train: stopped by SIGTERM at step {step}; resume by rerunning")
                return {"step": step, "stopped": True} if dist.main else {}

        # ---- final outputs (rank 0): entropy tables, log, EMA-baked model
        if not dist.main:
            return {}
        tables, tables_source = entropy.final_tables()
        tables.save(out_dir / "entropy")
        log(f"entropy tables: {tables_source} -> {out_dir / 'entropy'}")
        prov = provenance(model_cfg)
        df = pd.DataFrame(log_rows)
        for k, v in prov.items():
            df[k] = v
        write_parquet(out_dir / "train_log.parquet", df)
        total_wall = wall_before + time.monotonic() - t_start
        rates = df["steps_per_s"].replace([np.inf], np.nan).dropna()
        summary = {
            "step": step, "n_params": n_params, "wall_time_s": total_wall,
            "steps_per_s": float(rates.median()) if len(rates) else float("nan"),
            "bits_per_s": float(rates.median() * bits_per_step) if len(rates) else float("nan"),
            "steps_per_s_overall": step / total_wall if total_wall > 0 else float("nan"),   # incl. validation, checkpoints
            "loss_first": float(df["loss"].iloc[0]) if len(df) else float("nan"),
            "loss_last": float(df["loss"].iloc[-1]) if len(df) else float("nan"),
            "val_loss_last": float(df["val_loss"].dropna().iloc[-1]) if df["val_loss"].notna().any() else float("nan"),
            "entropy_ready_step": entropy.ready_step, "entropy_first_gamma_step": first_gamma_step,
            "entropy_tables": tables_source,
        }
        meta = {
            "architecture": arch, "training": t, "bits": int(bits), "seq_len": int(seq_len), "step": step,
            "sigma_data": float(t["sigma_data"]), "n_params": n_params, "world_size": dist.world_size,
            "data": saved_config["data"], "summary": summary, **prov, "provenance": prov,
        }
        ckpt_io.save(ckpt_dir / "final.pt", {"format": ckpt_io.MODEL_FORMAT, "model": ema.state_dict()["shadow"],
                                             "meta": meta})
        log(f"done: {step} steps in {total_wall:.1f}s ({summary['steps_per_s']:.3g} steps/s, "
            f"{summary['bits_per_s']:.3g} bits/s); loss {summary['loss_first']:.4g} -> {summary['loss_last']:.4g}, "
            f"val (EMA) {summary['val_loss_last']:.4g}; entropy tables ready at step {entropy.ready_step}, "
            f"first used at step {first_gamma_step} -> {ckpt_dir / 'final.pt'}")
        return summary
    finally:
        if handler_installed:
            signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)
        if dist.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


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
