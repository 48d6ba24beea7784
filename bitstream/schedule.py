"""The entropy-rate noise schedule and the σ grids built from it (spec §4.4, §5, Appendix A.2-A.3).

What is estimated (§5.1): by I-MMSE, the information about ``x0`` in ``x_σ`` changes with ``ln σ`` at a
rate ∝ mmse(σ)/σ². The model's own per-bit MSE ``m_b`` (§4.2) is the mmse proxy, so each training
example yields one rate sample ``ρ_b = m_b/σ_b²``. A FIFO of (σ, m) pairs (``EntropyBuffer``) is binned
in ``ln σ`` every few thousand steps (``rebuild_entropy_tables``) into a histogram
``pdf_k ∝ g(σ_k)·rate_k^p`` — the training σ distribution after the warm-up (``mixing_gamma``,
``EntropySchedule.sample``) and, inverted, the sampler's σ grid (``EntropySchedule.sigma_grid``).

Tables on disk are exactly the paper's released format (§5.3): four float32 1-D tensors saved with
``torch.save`` — ``entropy_pdf.pt`` (K,), ``entropy_cdf.pt`` (K,), ``entropy_sigmas.pt`` (K,) geometric
bin midpoints, ``entropy_edges.pt`` (K+1,) log-spaced edges in σ units — so the released tables load
with ``EntropySchedule.from_dir`` and ours load in upstream code.

Dead bins (§5.7, §14.4). Once every training σ comes from the histogram, a bin with zero mass is never
sampled again, so its rate stays 0 forever and the support can only shrink (the released tables have
zero mass below σ ≈ 0.12, yet sampling ends at σ = 0.08). Our choice: the tables keep the paper's
formula and format unchanged, and ``EntropySchedule.sample`` takes an optional ``floor`` ε — the
fraction of each batch drawn log-uniformly over the *whole* [σ_min, σ_max] range instead of from the
table. With ε > 0 every bin keeps receiving ≈ ε·N/K samples per rebuild window, so a bin whose rate
becomes measurable again can recover, and the network still sees the low σ at which the final
denoising call is made. ``floor = 0`` (the default) reproduces the paper's behaviour exactly.
"""

from __future__ import annotations

import math
import warnings
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bitstream.io import torch_save

TABLE_NAMES = ("pdf", "cdf", "sigmas", "edges")
ENTROPY_TARGETS = {"rate": 1.0, "sqrt-rate": 0.5}


def _table_path(directory: str | os.PathLike, name: str) -> Path:
    return Path(directory) / f"entropy_{name}.pt"


# --------------------------------------------------------------------------------------------------
# When the table takes over from the base sampler, spec §4.4
# --------------------------------------------------------------------------------------------------

def mixing_gamma(step: int, warmup: int, transition: int, gamma_max: float) -> float:
    """Probability that a training σ comes from the entropy table at optimizer step ``step`` (spec §4.4).

    ``γ = 0`` before ``warmup``, then a linear ramp over ``transition`` steps up to ``gamma_max``
    (``transition = 0`` switches straight to ``gamma_max``).
    """
    if step < warmup:
        return 0.0
    if transition <= 0:
        return float(gamma_max)
    return float(gamma_max) * min((step - warmup) / transition, 1.0)


# --------------------------------------------------------------------------------------------------
# FIFO of (σ, per-example MSE) pairs, spec §5.2
# --------------------------------------------------------------------------------------------------

class EntropyBuffer:
    """CPU ring buffer of the last ``capacity`` (σ_b, m_b) pairs (spec §5.2).

    Upstream did not checkpoint the FIFO (it refilled after a resume); ``state_dict`` /
    ``load_state_dict`` let training keep it, so a resumed run rebuilds from the same data.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"entropy buffer capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._sigma = torch.zeros(self.capacity, dtype=torch.float32)
        self._mse = torch.zeros(self.capacity, dtype=torch.float32)
        self._next = 0      # slot the next value goes to
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, sigma: torch.Tensor, mse: torch.Tensor) -> None:
        """Append a batch of pairs (any device); the oldest entries are overwritten when full."""
        sigma = torch.as_tensor(sigma).detach().float().flatten().cpu()
        mse = torch.as_tensor(mse).detach().float().flatten().cpu()
        if sigma.shape != mse.shape:
            raise ValueError(f"EntropyBuffer.push: sigma {tuple(sigma.shape)} and mse {tuple(mse.shape)} differ")
        if sigma.numel() > self.capacity:               # only the newest `capacity` pairs survive anyway
            sigma, mse = sigma[-self.capacity:], mse[-self.capacity:]
        n = sigma.numel()
        idx = (self._next + torch.arange(n)) % self.capacity
        self._sigma[idx] = sigma
        self._mse[idx] = mse
        self._next = (self._next + n) % self.capacity
        self._size = min(self._size + n, self.capacity)

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, m) of the stored pairs, oldest first (copies)."""
        if self._size < self.capacity:
            return self._sigma[: self._size].clone(), self._mse[: self._size].clone()
        order = (self._next + torch.arange(self.capacity)) % self.capacity
        return self._sigma[order], self._mse[order]

    def clear(self) -> None:
        self._next = self._size = 0

    def state_dict(self) -> dict:
        sigma, mse = self.data()
        return {"capacity": self.capacity, "sigma": sigma, "mse": mse}

    def load_state_dict(self, state: dict) -> None:
        """Restore pairs saved by ``state_dict`` (a smaller capacity keeps the newest pairs)."""
        try:
            sigma, mse = state["sigma"], state["mse"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"EntropyBuffer.load_state_dict: expected keys 'sigma' and 'mse', got {state!r:.80}") from err
        self.clear()
        self.push(sigma, mse)


# --------------------------------------------------------------------------------------------------
# The tables, spec §5.2-§5.5
# --------------------------------------------------------------------------------------------------

@dataclass
class EntropySchedule:
    """The four entropy tables (spec §5.3): ``pdf`` (K,), ``cdf`` (K,), ``sigmas`` (K,), ``edges`` (K+1,).

    ``sigmas`` are the geometric bin midpoints (ascending), ``edges`` the bin edges in σ units, ``cdf``
    the running sum of ``pdf`` with its last entry exactly 1. Stored as float32 CPU tensors.
    """

    pdf: torch.Tensor
    cdf: torch.Tensor
    sigmas: torch.Tensor
    edges: torch.Tensor

    def __post_init__(self):
        for name in TABLE_NAMES:
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"entropy table {name!r}: expected a tensor, got {type(value).__name__}")
            setattr(self, name, value.detach().to("cpu", torch.float32).contiguous())
        k = self.pdf.shape[0] if self.pdf.ndim == 1 else -1
        expected = {"pdf": (k,), "cdf": (k,), "sigmas": (k,), "edges": (k + 1,)}
        for name in TABLE_NAMES:
            shape = tuple(getattr(self, name).shape)
            if k < 1 or shape != expected[name]:
                raise ValueError(f"entropy table {name!r}: expected a 1-D tensor of shape {expected[name]} "
                                 f"(pdf has shape {tuple(self.pdf.shape)}), got {shape}")
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"entropy table {name!r}: contains non-finite values")

    @property
    def num_bins(self) -> int:
        return int(self.pdf.shape[0])

    # ---- files ------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "EntropySchedule":
        """Read ``entropy_{pdf,cdf,sigmas,edges}.pt`` from ``path`` (ours or the paper's released tables)."""
        path = Path(path)
        tables = {}
        for name in TABLE_NAMES:
            file = _table_path(path, name)
            if not file.exists():
                raise FileNotFoundError(f"{file}: entropy table not found (a table directory holds "
                                        f"entropy_{{pdf,cdf,sigmas,edges}}.pt)")
            try:
                value = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
                raise ValueError(f"{file}: not a readable torch tensor file ({err})") from err
            if not isinstance(value, torch.Tensor) or value.ndim != 1:
                what = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{file}: expected a 1-D float tensor, got {what}")
            tables[name] = value
        k = tables["pdf"].shape[0]
        for name, n in (("cdf", k), ("sigmas", k), ("edges", k + 1)):
            if tables[name].shape[0] != n:
                raise ValueError(f"{_table_path(path, name)}: expected shape ({n},) to match "
                                 f"{_table_path(path, 'pdf').name} ({k},), got {tuple(tables[name].shape)}")
        return cls(**tables)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the four tables atomically, in the released format (float32 1-D CPU tensors, §5.3)."""
        for name in TABLE_NAMES:
            torch_save(_table_path(directory, name), getattr(self, name).to("cpu", torch.float32).clone())

    # ---- training draw, Appendix A.3 --------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator, sigma_min: float = 0.002, sigma_max: float = 80.0,
               floor: float = 0.0, device: torch.device | str | None = None) -> torch.Tensor:
        """Draw ``n`` training σ from the histogram (spec A.3), [n] float32.

        Bin ``k`` by inverse CDF on ``u ~ U[0,1)``, then ``ln σ`` uniform inside the bin's edges (clamped
        to [sigma_min, sigma_max]). We use the first ``k`` with ``cdf_k > u`` (upstream's
        ``searchsorted`` left would pick an empty leading bin when ``u`` is exactly 0 — a measure-zero
        difference). With ``floor`` ε > 0 each draw is, with probability ε, log-uniform over the whole
        [sigma_min, sigma_max] instead (our dead-bin guard, module docstring); ε = 0 is the paper.
        """
        dev = generator.device
        cdf, edges = self.cdf.to(dev, torch.float64), self.edges.to(dev, torch.float64)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=dev)
        k = torch.searchsorted(cdf, u, right=True).clamp(0, self.num_bins - 1)
        ln_lo = edges[k].clamp(sigma_min, sigma_max).log()
        ln_hi = edges[k + 1].clamp(sigma_min, sigma_max).log()
        ln_sigma = ln_lo + torch.rand(n, generator=generator, dtype=torch.float64, device=dev) * (ln_hi - ln_lo)
        if floor > 0:
            use_floor = torch.rand(n, generator=generator, dtype=torch.float64, device=dev) < floor
            ln_flat = math.log(sigma_min) + torch.rand(n, generator=generator, dtype=torch.float64, device=dev) * (
                math.log(sigma_max) - math.log(sigma_min))
            ln_sigma = torch.where(use_floor, ln_flat, ln_sigma)
        return ln_sigma.exp().float().to(device if device is not None else dev)

    # ---- sampler quantities, §5.4-§5.5 ------------------------------------------------------------

    def sigma_at_quantile(self, q):
        """σ(q) (spec §5.5): ``i = searchsorted(cdf, q)`` (left); ``sig[0]`` if ``i = 0``, else linear
        interpolation between ``(cdf[i−1], sig[i−1])`` and ``(cdf[i], sig[i])`` at ``q``.

        A float in gives a float out; a tensor gives a float64 tensor of the same shape.
        """
        scalar = not isinstance(q, torch.Tensor)
        qt = torch.as_tensor(q, dtype=torch.float64).flatten()
        out = _inverse_cdf(self.cdf.double(), self.sigmas.double(), qt)
        if scalar:
            return float(out[0])
        return out.view(torch.as_tensor(q).shape)

    def sigma_grid(self, num_points: int, sigma_min: float = 0.08, sigma_max: float = 80.0) -> torch.Tensor:
        """The sampler's entropic σ grid (spec §5.4), float64 [num_points], strictly descending.

        Reproduces the upstream construction including its quirks (§14.6): the CDF value of bin k (mass
        up to its upper edge) is paired with the bin *midpoint*; both maps are piecewise linear in σ (not
        ln σ); the top is ``min(σ_max, sig[-1])`` (76.756 for the released tables, not 80):

            σ_lo' = max(σ_min, sig[0]);  σ_hi' = min(σ_max, sig[-1])
            F_lo, F_hi = interp(sig → cdf) at σ_lo', σ_hi'
            u_j = F_lo + j/(N−1)·(F_hi − F_lo), clamped to [cdf[0], 1 − 1e−7];  σ_j = σ(u_j)  (§5.5)
            ends forced to σ_lo', σ_hi'; reversed to descending.

        Falls back to a log-uniform grid between σ_hi' and σ_lo' when ``F_hi − F_lo < 1e-12``.
        """
        if num_points < 2:
            raise ValueError(f"sigma_grid: num_points must be >= 2, got {num_points}")
        sig, cdf = self.sigmas.double(), self.cdf.double().clone()
        cdf[-1] = 1.0
        lo = max(float(sigma_min), float(sig[0]))
        hi = min(float(sigma_max), float(sig[-1]))
        if not lo < hi:
            raise ValueError(f"sigma_grid: empty σ range [{lo}, {hi}] (sigma_min={sigma_min}, "
                             f"sigma_max={sigma_max}, table covers [{float(sig[0])}, {float(sig[-1])}])")
        f_lo, f_hi = _interp(torch.tensor([lo, hi], dtype=torch.float64), sig, cdf).tolist()
        if f_hi - f_lo < 1e-12:
            grid = torch.logspace(math.log10(lo), math.log10(hi), num_points, dtype=torch.float64)
        else:
            j = torch.arange(num_points, dtype=torch.float64)
            u = (f_lo + j / (num_points - 1) * (f_hi - f_lo)).clamp(float(cdf[0]), 1.0 - 1e-7)
            grid = _inverse_cdf(cdf, sig, u)
        grid[0], grid[-1] = lo, hi
        return grid.flip(0).contiguous()


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``numpy.interp`` for increasing ``xp``: piecewise linear, constant beyond the ends."""
    i = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    t = ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return y0 + t * (y1 - y0)


def _inverse_cdf(cdf: torch.Tensor, sig: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """σ(q) of spec §5.5 for a vector of q (float64). Well defined on flat stretches of the CDF:
    ``cdf[i−1] < q ≤ cdf[i]`` so the interpolation denominator is positive."""
    i = torch.searchsorted(cdf, q).clamp(max=cdf.numel() - 1)
    j = (i - 1).clamp(min=0)
    f0, f1, s0, s1 = cdf[j], cdf[i], sig[j], sig[i]
    den = f1 - f0
    t = torch.where(den > 0, (q - f0) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(q))
    out = s0 + t.clamp(0.0, 1.0) * (s1 - s0)
    return torch.where(i == 0, sig[0].expand_as(out), out)


# --------------------------------------------------------------------------------------------------
# Rebuilding the tables from the buffer, spec §5.2 / Appendix A.2
# --------------------------------------------------------------------------------------------------

def rebuild_entropy_tables(sigmas: torch.Tensor, mse: torch.Tensor, num_bins: int = 128, sigma_min: float = 0.002,
                           sigma_max: float = 80.0, c: float = 0.1, n: float = 3.0,
                           target: str | float = "sqrt-rate") -> EntropySchedule:
    """Histogram ``pdf_k ∝ g(σ_k)·rate_k^p`` of the entropy rate over ``ln σ`` (spec §5.2, A.2).

    1. clamp σ to [σ_min, σ_max]; K+1 edges equally spaced in ln σ; midpoints = geometric means;
    2. ``rate_k`` = mean of ``ρ = max(m/(σ² + 1e-12), 0)`` over the samples in bin k (empty bin → 0);
    3. regulariser ``g(σ) = σⁿ/(σⁿ + cⁿ)`` at the midpoint (suppresses σ ≲ c);
    4. ``p`` = 1 for ``target="rate"``, 0.5 for ``"sqrt-rate"`` (paper), or a given number;
    0. non-finite (σ, mse) pairs are dropped, with a warning (spec §5.2);
    5. ``pdf`` normalised to sum 1 (uniform if the total is not positive and finite);
    6. ``cdf`` = running max of the running sum of the (float32) pdf, last entry exactly 1.

    Bins are half-open on the left, ``(edge_k, edge_{k+1}]`` (bucketize − 1), with σ_min itself in bin 0.
    An empty buffer gives the uniform table (so training can always write tables, even before a rebuild).
    Accumulation is in float64; the returned tables are float32 (released format, §5.3).
    """
    if num_bins < 1:
        raise ValueError(f"rebuild_entropy_tables: num_bins must be >= 1, got {num_bins}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"rebuild_entropy_tables: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if isinstance(target, str):
        if target not in ENTROPY_TARGETS:
            raise ValueError(f"entropy target must be one of {sorted(ENTROPY_TARGETS)} or a number, got {target!r}")
        p = ENTROPY_TARGETS[target]
    else:
        p = float(target)
    sigma = torch.as_tensor(sigmas).detach().double().flatten().cpu()
    m = torch.as_tensor(mse).detach().double().flatten().cpu()
    if sigma.shape != m.shape:
        raise ValueError(f"rebuild_entropy_tables: sigmas {tuple(sigma.shape)} and mse {tuple(m.shape)} differ")
    # Spec §5.2: non-finite pairs are dropped. Kept, one NaN made every bin sum NaN and the whole
    # table silently uniform.
    finite = torch.isfinite(sigma) & torch.isfinite(m)
    dropped = int((~finite).sum())
    if dropped:
        warnings.warn(f"rebuild_entropy_tables: dropped {dropped} of {sigma.numel()} (σ, mse) pairs that are "
                      f"not finite (spec §5.2)", RuntimeWarning, stacklevel=2)
        sigma, m = sigma[finite], m[finite]
    sigma = sigma.clamp(sigma_min, sigma_max)

    log_edges = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_bins + 1, dtype=torch.float64)
    k = (torch.bucketize(sigma.log(), log_edges) - 1).clamp(0, num_bins - 1)
    rate = (m / (sigma * sigma + 1e-12)).clamp(min=0)
    rate_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, k, rate)
    count = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, k, torch.ones_like(rate))
    mean_rate = rate_sum / (count + 1e-8)

    mid = ((log_edges[:-1] + log_edges[1:]) / 2).exp()
    g = mid**n / (mid**n + c**n)
    weight = g * mean_rate**p
    total = weight.sum()
    if not (torch.isfinite(total) and total > 0):
        pdf = torch.full((num_bins,), 1.0 / num_bins, dtype=torch.float64)
    else:
        pdf = weight / total
    pdf = pdf.float()
    cdf = torch.cummax(torch.cumsum(pdf, 0), 0).values
    cdf[-1] = 1.0
    return EntropySchedule(pdf=pdf, cdf=cdf, sigmas=mid.float(), edges=log_edges.exp().float())


# --------------------------------------------------------------------------------------------------
# The full training σ draw (§4.3 + §4.4) and the Karras grid (§2)
# --------------------------------------------------------------------------------------------------

def draw_training_sigma(n: int, step: int, training: dict, schedule: EntropySchedule | None,
                        generator: torch.Generator, floor: float | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Training σ for one batch (spec §4.4, ``EntropyScheduleController.draw_sigma``), [n] float32.

    ``training`` is the schema's ``training`` section (keys sigma_sampler, p_mean, p_std, sigma_min,
    sigma_max, entropy.{enabled, warmup_steps, transition_steps, gamma_max}). Each example takes a base
    draw (§4.3); with probability ``mixing_gamma(step)`` it is replaced by a table draw — only once a
    table exists (``schedule`` not None) and the schedule is enabled. ``floor``: the dead-bin guard of
    ``EntropySchedule.sample``; ``None`` reads ``training.entropy.floor`` if the config has that key, else 0
    (the paper).
    """
    from bitstream.diffusion import sample_sigma_base

    lo, hi = float(training.get("sigma_min", 0.002)), float(training.get("sigma_max", 80.0))
    sigma = sample_sigma_base(n, training.get("sigma_sampler", "log_normal"), generator,
                              p_mean=float(training.get("p_mean", -1.2)), p_std=float(training.get("p_std", 1.2)),
                              sigma_min=lo, sigma_max=hi)
    ent = training.get("entropy", {}) or {}
    floor = float(ent.get("floor", 0.0)) if floor is None else float(floor)
    if schedule is not None and ent.get("enabled", True):
        gamma = mixing_gamma(step, int(ent.get("warmup_steps", 40000)), int(ent.get("transition_steps", 10000)),
                             float(ent.get("gamma_max", 1.0)))
        if gamma > 0:
            dev = generator.device
            use_table = torch.rand(n, generator=generator, device=dev) < gamma
            from_table = schedule.sample(n, generator, lo, hi, floor=floor)
            sigma = torch.where(use_table, from_table, sigma)
    return sigma.to(device if device is not None else generator.device)


def karras_grid(num_points: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. grid (spec §2): ``σ_i = (σ_max^{1/ρ} + t_i(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ``,
    ``t_i = linspace(0, 1, N)``; float64, descending, endpoints exactly σ_max and σ_min."""
    if num_points < 2:
        raise ValueError(f"karras_grid: num_points must be >= 2, got {num_points}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_grid: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    t = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    grid = (a + t * (b - a)) ** rho
    grid[0], grid[-1] = sigma_max, sigma_min
    return grid
