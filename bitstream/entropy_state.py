"""The entropy schedule inside a training run (spec §4.2, §5.2, §5.7, fix of §14.5).

The FIFO of (σ, m) pairs the training steps push, the tables rebuilt from it every ``update_every``
steps, and what a checkpoint saves of them. The histogram maths itself is :mod:`bitstream.schedule`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as torch_dist

from bitstream.distributed import Dist, all_reduce_sum


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
