"""One optimizer step of the diffusion model, in the order of spec §13 "Step order" (pseudocode A.1).

:func:`train_step` is the whole method in one view: σ (base sampler mixed with the entropy tables),
noise, the self-conditioning choice (:func:`draw_batch`); the loss with its self-conditioning pass
(:func:`diffusion_loss`); backward, clip, AdamW, lr, EMA (:func:`bitstream.train_optim.optimizer_step`);
the (σ, m) pairs of the whole global batch into the entropy buffer. :func:`validate` is the same loss
on a fixed draw. The loop that drives the step is :mod:`bitstream.train`; the state it mutates,
:class:`bitstream.train_state.TrainState`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitstream.distributed import Dist, all_gather_cat, all_reduce_sum
from bitstream.train_data import derive_seed, rows_to_bits
from bitstream.train_optim import optimizer_step
from bitstream.train_state import TrainState


@dataclass
class StepResult:
    """What the loop needs to know about one step (for the log and the progress bar)."""
    loss: torch.Tensor           # this rank's mean loss, detached
    grad_norm: float             # before clipping
    lr: float                    # the lr the step ran at
    gamma: float                 # entropy-schedule mixing γ in force
    sigma_global: torch.Tensor   # [B] σ of the global batch, on CPU
    tables_rebuilt: bool         # the entropy tables were rebuilt after this step


def train_step(state: TrainState, net: torch.nn.Module, x0: torch.Tensor, arch: dict, t: dict, dist: Dist,
               autocast, out_dir: Path) -> StepResult:
    """One optimizer step on this rank's bits ``x0`` ``[b, S]`` (spec §13 "Step order", A.1).

    ``net`` is ``state.model`` as wrapped for gradients (DDP / compile). Advances ``state.step``.
    """
    gamma = state.entropy.gamma(state.step)
    if gamma > 0 and state.first_gamma_step is None:
        state.first_gamma_step = state.step + 1          # 1-based number of the first step using the tables
    tables = state.entropy.tables if t["entropy"]["enabled"] else None
    d = draw_batch(int(t["batch_size"]), x0.shape[1], t, arch["self_condition"], state.generators["sigma"],
                   state.generators["noise"], tables, state.step, dist)
    lr = state.scheduler.get_last_lr()[0]
    state.optimizer.zero_grad(set_to_none=True)
    loss, mse = diffusion_loss(net, state.model, x0, d, arch, t, autocast)
    grad_norm = optimizer_step(loss, state.model, state.optimizer, state.scheduler, state.ema, float(t["grad_clip"]))
    state.step += 1
    # The buffer gets (σ, m) of the whole global batch, in rank order (fix of §14.5).
    pairs = all_gather_cat(torch.stack([d.sigma.float(), mse.float()], 1), dist)
    state.entropy.push(pairs[:, 0], pairs[:, 1])
    rebuilt = state.entropy.maybe_rebuild(state.step, out_dir)
    return StepResult(loss.detach(), grad_norm, lr, gamma, d.sigma_global, rebuilt)


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
