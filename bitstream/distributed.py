"""Processes and devices of a training run: torchrun's environment, collectives, precision (spec §13).

One process is rank 0 of 1 and every collective is then a no-op, so the same code runs under
``python -m`` and under ``torchrun``.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


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


def gather_objects(obj, dist: Dist) -> list:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` for one process)."""
    if not dist.enabled:
        return [obj]
    gathered = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def make_autocast(precision: str, device: torch.device):
    """``(autocast, use_bf16)``: a factory of bf16 autocast contexts (``precision`` bf16, or auto on CUDA),
    else of no-op contexts. Turns TF32 on for CUDA matmuls (spec §13)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")

    def autocast():
        if not use_bf16:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return autocast, use_bf16


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
