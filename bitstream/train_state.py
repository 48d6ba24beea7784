"""The resumable state of a training run: the one place that lists what ``checkpoints/last.pt`` holds.

A run killed and restarted from ``last.pt`` ends with exactly the same weights as one run straight
through (spec §13 "Checkpoint contents"; tested), so everything that a step reads and changes lives
in :class:`TrainState` and is saved by :meth:`TrainState.save`. The file format and the strict
loading are :mod:`bitstream.checkpoint` (fix of §14.11). Nothing here is diffusion-specific but
the optional ``entropy`` and ``first_gamma_step``: another trainer on the same cache (the
autoregressive reference) passes its own named generators and ``entropy=None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bitstream import checkpoint as ckpt_io
from bitstream.distributed import Dist, gather_objects
from bitstream.entropy_state import EntropyState
from bitstream.train_data import derive_seed
from bitstream.train_optim import EMA


class LogInterval:
    """Accumulates the steps between two log rows (saved in last.pt so a resumed log is identical)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.steps, self.loss, self.grad_norm, self.train_time = 0, 0.0, 0.0, 0.0
        self.sigmas: list[torch.Tensor] = []

    def add(self, loss: float, grad_norm: float, sigmas: torch.Tensor, seconds: float) -> None:
        self.steps += 1
        self.loss += loss
        self.grad_norm += grad_norm
        self.sigmas.append(sigmas)
        self.train_time += seconds

    def state_dict(self) -> dict:
        return {"steps": self.steps, "loss": self.loss, "grad_norm": self.grad_norm, "train_time": self.train_time,
                "sigmas": torch.cat(self.sigmas) if self.sigmas else torch.zeros(0)}

    def load_state_dict(self, s: dict) -> None:
        self.steps, self.loss, self.grad_norm, self.train_time = int(s["steps"]), float(s["loss"]), \
            float(s["grad_norm"]), float(s["train_time"])
        self.sigmas = [s["sigmas"]] if len(s["sigmas"]) else []


@dataclass
class TrainState:
    """Everything a resumed run needs to continue bit for bit. ``last.pt`` holds exactly these fields,
    plus the config, the data position (a function of ``step``), the world size and provenance.

    Besides these, the step uses torch's global RNG (dropout masks only); its per-rank states are
    saved too (``rng.torch`` / ``rng.cuda``).
    """
    model: torch.nn.Module                     # raw weights (not the DDP / compiled wrapper)
    ema: EMA                                   # EMA shadow
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generators: dict[str, torch.Generator]     # the step's named random streams (diffusion: "sigma", "noise")
    entropy: EntropyState | None = None        # diffusion: (σ, m) buffer and tables; None if the trainer has none
    interval: LogInterval = field(default_factory=LogInterval)   # steps since the last log row
    log_rows: list[dict] = field(default_factory=list)          # the log so far
    step: int = 0                              # optimizer steps taken
    wall_before: float = 0.0                   # wall time of earlier jobs of this run
    first_gamma_step: int | None = None        # first step that drew σ from the entropy tables

    def save(self, path: Path, dist: Dist, *, config: dict, data_position: dict, provenance: dict,
             wall_time_s: float) -> None:
        """Write the state to ``path`` (rank 0; every rank must call: the RNG states are gathered)."""
        cuda = dist.device.type == "cuda"
        gathered = gather_objects((torch.get_rng_state(), torch.cuda.get_rng_state(dist.device) if cuda else None),
                                  dist)
        if not dist.main:
            return
        ckpt_io.save(path, {
            "format": ckpt_io.TRAIN_STATE_FORMAT, "step": self.step, "config": config,
            "model": ckpt_io.clean_state_dict(self.model.state_dict()), "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": [g[0] for g in gathered], "cuda": [g[1] for g in gathered] if cuda else [],
                    **{name: gen.get_state() for name, gen in self.generators.items()}},
            "data": data_position, "entropy": None if self.entropy is None else self.entropy.state_dict(),
            "interval": self.interval.state_dict(), "log": self.log_rows, "wall_time_s": wall_time_s,
            "first_gamma_step": self.first_gamma_step, "world_size": dist.world_size, "provenance": provenance,
        })

    def load(self, path: Path, dist: Dist, *, config: dict, seed: int, log: Callable[[str], None]) -> None:
        """Continue from ``path``, refusing a state saved with another config (except the resume-free keys)."""
        state = ckpt_io.load(path, map_location="cpu")
        if state["format"] != ckpt_io.TRAIN_STATE_FORMAT:
            raise ValueError(f"{path}: not a training state (format {state['format']!r})")
        ckpt_io.check_config(state["config"], config, path, ignore=ckpt_io.resume_ignore(),
                             hint=f"Delete {path} to start this model from scratch, or choose another --out-dir")
        ckpt_io.load_state_dict_strict(self.model, state["model"], str(path))
        self.ema.load_state_dict(state["ema"], str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.entropy is not None:
            self.entropy.load_state_dict(state["entropy"])
        rng = state["rng"]
        for name, gen in self.generators.items():
            gen.set_state(rng[name])
        if len(rng["torch"]) == dist.world_size:
            torch.set_rng_state(rng["torch"][dist.rank])
            if dist.device.type == "cuda" and rng.get("cuda"):
                torch.cuda.set_rng_state(rng["cuda"][dist.rank], dist.device)
        else:
            # Only dropout masks use torch's RNG; they cannot be carried over to a different number
            # of processes. Reseeded per rank and step; noted in the log.
            torch.manual_seed(derive_seed(seed, "dropout", dist.rank, int(state["step"])))
            log(f"resuming with {dist.world_size} processes (saved with {len(rng['torch'])}): "
                f"dropout RNG reseeded")
        self.interval.load_state_dict(state["interval"])
        self.log_rows = list(state["log"])
        self.step, self.wall_before = int(state["step"]), float(state["wall_time_s"])
        self.first_gamma_step = state.get("first_gamma_step")
