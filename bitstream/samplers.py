"""Samplers for continuous bitstream diffusion (spec §8), in the style of the EDM reference sampler.

A sampler is a plain function: it takes a denoiser, the initial latents, a descending σ grid and the
paper's knobs, and returns the thresholded bits. The denoiser is any callable

    denoiser(x [B, S] fp32, sigma_label [B] fp32, x0_hat [B, S] or None) -> logits ℓ [B, S] fp32

with ``sigmoid(ℓ) = D ≈ E[x0 | x]`` (spec §3; :func:`model_denoiser` wraps an SDT with the matched
filter through ``bitstream.diffusion.denoise_logits``). Nothing here knows about networks, so the
samplers are tested with closed-form denoisers.

* :func:`sample_ddim` — Euler / DDIM step of the probability-flow ODE (spec §8.2): the paper sampler on
  the entropic grid (spec §5.4), or on a Karras grid (spec §2).
* :func:`sample_heun` — Heun's second-order step on every interval, the last one included (spec §8.6).
* Both take EDM churn (spec §8.3): per-step ``gamma`` with noise std ``s_noise`` whenever the grid σ_i
  lies in ``window = (σ_lo, σ_hi)``; ``gamma = 0`` runs exactly the deterministic sampler (no noise is
  drawn). Self-conditioning (spec §7) ``carry`` | ``refined`` | ``none``; ATI shift ``eta`` of the
  network's σ label (spec §8.4); a final denoising call at the terminal σ and ``bits = D > threshold``
  (strict, spec §8.2 / §8.8).
* :func:`plan_from_spec` turns a config ``sampler_spec`` (schema ``$defs/sampler_spec``) into the grid
  and knobs (:class:`SamplerPlan`); :func:`run_plan` runs it.

Conventions and deliberate differences from upstream:

* **Honest NFE** (contract; spec §8.5, §14.7). Upstream builds a grid of ``target_nfe − 1`` points and
  reports ``target_nfe``, but makes only ``target_nfe − 1`` network calls: it over-counts by one. Here a
  grid of N points costs ``c·(N − 1) + 1`` calls (c = 1 DDIM, 2 Heun, +1 with refined SC: the loop plus
  one final call), the spec's ``nfe`` is that number, and the reported NFE is a *counter* of the calls
  actually made (:class:`CallCounter`), never a formula. So ``nfe: 256`` with DDIM is a 256-point grid
  and 256 calls. An ``nfe`` that no grid reaches exactly (e.g. an even nfe for Heun) is an error.
* **Churn γ is the per-step target** (spec §14.7): γ_i = ``gamma`` inside the window, no
  ``s_churn/(N−1)`` detour and so no ``(NFE−1)/(NFE−2)`` inflation; capped at √2 − 1 like EDM.
* **Self-conditioning "absent" is ``x0_hat = None``** (contract; spec §7, §14.9): the first step and
  the ``none`` mode pass None, which the model treats as all bits at probability 0.5. Upstream starts
  sampling from zeros (probability 0); we use the one convention the whole project trains with.
* **Randomness belongs to the sample, not the micro-batch** (spec §14.20). Upstream seeds each
  micro-batch from the tag string and the micro-batch offset, so results change with the micro-batch
  size. Here every sample owns a generator seeded from ``(seed, sample_index)`` (:class:`SampleNoise`,
  like EDM's stacked per-image generators): its initial latents and every step's churn noise come from
  that stream alone, so the seed decides the samples whatever the batching. When churn is on, a noise
  vector is drawn at *every* step (used only inside the window), so step i's noise is the same for
  every window and γ of one seed (common random numbers across specs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "SAMPLERS", "SC_MODES", "WINDOWS", "SPEC_DEFAULTS", "GAMMA_MAX", "ENTROPY_FILES",
    "CallCounter", "SampleNoise", "SampleOutput", "SamplerPlan",
    "ati_shift", "churn_gammas", "sample_ddim", "sample_heun",
    "spec_with_defaults", "calls_per_step", "grid_points_for_nfe", "plan_from_spec", "run_plan",
    "model_denoiser",
]

# sampler name -> (integrator, σ grid)   (spec §8: ddim_entropic is the paper sampler)
SAMPLERS = {
    "ddim_entropic": ("ddim", "entropic"),
    "ddim_karras": ("ddim", "karras"),
    "heun_entropic": ("heun", "entropic"),
    "heun_karras": ("heun", "karras"),
}
SC_MODES = ("carry", "refined", "none")
WINDOWS = ("full", "fixed", "entropy_cdf")
GAMMA_MAX = math.sqrt(2.0) - 1.0  # EDM's cap: σ̂ ≤ √2·σ_i
ENTROPY_FILES = tuple(f"entropy_{name}.pt" for name in ("pdf", "cdf", "sigmas", "edges"))

# Defaults of workflow/schemas/config.schema.yaml `$defs/sampler_spec` (a test keeps them in sync), so
# the samplers also work outside the workflow (python -m bitstream.sample --spec config.yaml:NAME).
SPEC_DEFAULTS = {
    "gamma": 0.0, "s_noise": 1.003, "window": "entropy_cdf", "q_lo": 0.0, "q_hi": 1.0,
    "s_tmin": 0.0, "s_tmax": 80.0, "sc_mode": "carry", "eta": 0.0, "terminal_sigma": 0.08,
    "sigma_max": 80.0, "rho": 7.0, "threshold": 0.5, "num_samples": 64, "micro_batch": 64,
    "resources": {},
}
_SPEC_KEYS = {"sampler", "nfe", "paper", *SPEC_DEFAULTS}

Denoiser = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# Honest call counting and per-sample noise


class CallCounter:
    """Wraps a denoiser and counts its calls: the NFE we report is this counter (contract, §8.5)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x, sigma_label, x0_hat):
        self.calls += 1
        return self.denoiser(x, sigma_label, x0_hat)


class SampleNoise:
    """One Gaussian stream per sample, seeded from ``(seed, sample_index)`` (spec §14.20 fixed).

    Sample ``i`` of seed ``s`` uses a generator seeded ``(base(s) + i) mod 2**32``, where ``base`` mixes
    the run seed through numpy's SeedSequence. Within one seed no two samples share a stream (the CPU
    generator, MT19937, only uses 32 bits of its seed, so hashing (s, i) independently would allow
    birthday collisions; consecutive MT seeds are decorrelated by its initialisation). The stream of a
    sample does not depend on which micro-batch it lands in or how large that is.

    ``randn(n)`` draws ``[B, n]`` (row b from sample b's stream); ``randn_like(x)`` matches ``x``. Same
    seed and device -> identical numbers; CPU and CUDA streams differ (different generators).
    """

    def __init__(self, seed: int, sample_indices: Sequence[int], device="cpu"):
        seed = int(seed)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        base = int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
        self.device = torch.device(device)
        self.sample_indices = [int(i) for i in sample_indices]
        self.generators = []
        for i in self.sample_indices:
            g = torch.Generator(device=self.device)
            g.manual_seed((base + i) % 2**32)
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, num: int, dtype=torch.float32) -> torch.Tensor:
        out = torch.empty(len(self.generators), num, dtype=dtype, device=self.device)
        for row, g in zip(out, self.generators):
            torch.randn(num, generator=g, out=row, dtype=dtype, device=self.device)
        return out

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"randn_like: batch of {x.shape[0]} rows, but {len(self.generators)} sample streams")
        return self.randn(x[0].numel(), dtype=x.dtype).reshape(x.shape)


# ---------------------------------------------------------------------------------------------------
# Knobs shared by the integrators


def ati_shift(sigma_state: float, sigma_noisier: float | None, eta: float) -> float:
    """The network's σ label under asymmetric time intervals (spec §8.4); only the label moves.

    ``exp(ln σ_state + η(ln σ_noisier − ln σ_state))`` clamped to ``[σ_state, σ_noisier]`` when η > 0
    and a noisier reference exists; otherwise ``σ_state``. The reference of grid point k is σ_{k−1}
    (none for the first step).
    """
    if eta <= 0 or sigma_noisier is None or not sigma_noisier > sigma_state:
        return sigma_state
    shifted = math.exp(math.log(sigma_state) + eta * (math.log(sigma_noisier) - math.log(sigma_state)))
    return min(max(shifted, sigma_state), sigma_noisier)


def churn_gammas(sigmas: Sequence[float], gamma: float, window: tuple[float, float]) -> list[float]:
    """Per-step churn γ_i for the N − 1 loop steps (spec §8.3): ``gamma`` if σ_i ∈ window, else 0.

    The window is inclusive; a relative slack of 1e-6 keeps a bound that was read from the same float32
    table as the grid (e.g. the entropic grid's top 76.756 = σ(q=1)) inside despite float rounding.
    """
    if not 0 <= gamma <= GAMMA_MAX + 1e-9:
        raise ValueError(f"gamma must be in [0, √2−1 = {GAMMA_MAX:.6f}], got {gamma}")
    lo, hi = window
    lo, hi = lo * (1 - 1e-6), hi * (1 + 1e-6)
    return [float(min(gamma, GAMMA_MAX)) if gamma > 0 and lo <= s <= hi else 0.0
            for s in list(sigmas)[:-1]]


@dataclass
class SampleOutput:
    bits: torch.Tensor        # [B, S] uint8, D_final > threshold (spec §8.8)
    probs: torch.Tensor       # [B, S] fp32, D_final
    x: torch.Tensor           # [B, S] fp32, final continuous state (at the terminal σ)
    nfe: int                  # denoiser calls actually made for this batch (= per trajectory)
    gammas: list = field(default_factory=list)  # churn γ_i used at each loop step


def _grid(sigmas) -> list[float]:
    s = [float(v) for v in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
    if len(s) < 2:
        raise ValueError(f"σ grid needs at least 2 points, got {len(s)}")
    if not all(a > b for a, b in zip(s, s[1:])) or s[-1] <= 0:
        raise ValueError(f"σ grid must be strictly descending and positive, got {s[:3]}…{s[-3:]}")
    return s


def _check_mode(sc_mode: str) -> None:
    if sc_mode not in SC_MODES:
        raise ValueError(f"sc_mode must be one of {SC_MODES}, got {sc_mode!r}")


def _churn(x, sigma, gamma, eps, s_noise):
    """EDM churn (spec §8.3): raise the noise from σ to σ̂ = σ(1 + γ) with fresh noise of std S_noise."""
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1.0 + gamma)
    return x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * eps, sigma_hat


def _label(sigma: float, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), sigma, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------------
# The integrators


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    latents: torch.Tensor,
    sigmas,
    *,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    gamma: float = 0.0,
    window: tuple[float, float] = (0.0, math.inf),
    s_noise: float = 1.003,
    sc_mode: str = "carry",
    eta: float = 0.0,
    threshold: float = 0.5,
    center: float = 0.5,
) -> SampleOutput:
    """DDIM / Euler probability-flow sampler with gated churn (spec §8.2, §8.3; Appendix A.4).

    ``latents`` [B, S] are standard normal; the start is ``x = center + σ_0·latents`` (spec §8.1).
    Per loop step i = 0..N−2 (churn → σ̂, label ``ati_shift(σ̂, σ_{i−1}, η)``):

        D = sigmoid(denoiser(x̂, σ_lab, x̂0));   x ← x̂ + (σ_{i+1} − σ̂)·(x̂ − D)/σ̂

    then one final call at σ_{N−1} and ``bits = D_final > threshold``. The step uses the true state
    noise σ̂; only the label is shifted. Self-conditioning: ``carry`` feeds D into the next call (and the
    final one) at no cost; ``refined`` adds a call at the new state (label ``ati_shift(σ_{i+1}, σ̂, η)``:
    the state came from σ̂, so σ̂ is the noisier reference; SC input D) whose
    probabilities are fed on; ``none`` always passes None. Calls: (N − 1)·(1 or 2) + 1.
    """
    _check_mode(sc_mode)
    s = _grid(sigmas)
    gammas = churn_gammas(s, gamma, window)
    f = CallCounter(denoiser)
    batch, device = latents.shape[0], latents.device
    x = center + s[0] * latents.to(torch.float32)
    x0_hat = None  # contract: absent self-conditioning is None (probability 0.5)
    for i in range(len(s) - 1):
        eps = randn_like(x) if gamma > 0 else None  # drawn every step: step i's noise ignores the window
        x_hat, sigma_hat = _churn(x, s[i], gammas[i], eps, s_noise)
        label = ati_shift(sigma_hat, s[i - 1] if i > 0 else None, eta)
        D = torch.sigmoid(f(x_hat, _label(label, batch, device), x0_hat).float())
        x = x_hat + ((s[i + 1] - sigma_hat) / sigma_hat) * (x_hat - D)
        if sc_mode == "carry":
            x0_hat = D
        elif sc_mode == "refined":
            # The state just came from σ̂ (not σ_i): σ̂ is the noisier reference of the ATI label.
            x0_hat = torch.sigmoid(f(x, _label(ati_shift(s[i + 1], sigma_hat, eta), batch, device), D).float())
    return _final(f, x, s, x0_hat, eta, threshold, gammas)


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    latents: torch.Tensor,
    sigmas,
    *,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    gamma: float = 0.0,
    window: tuple[float, float] = (0.0, math.inf),
    s_noise: float = 1.003,
    sc_mode: str = "carry",
    eta: float = 0.0,
    threshold: float = 0.5,
    center: float = 0.5,
) -> SampleOutput:
    """Heun (second order) probability-flow sampler with gated churn (spec §8.6).

    Every interval, the last one included (the terminal σ is > 0, so there is no Euler-only last step):
    D₁ at (x̂, σ̂) gives d = (x̂ − D₁)/σ̂ and the predictor x' = x̂ + (σ_{i+1} − σ̂)·d; D₂ at (x', σ_{i+1})
    (label ``ati_shift(σ_{i+1}, σ̂, η)``: the predictor came from the churned σ̂) with SC input D₁ gives d' = (x' − D₂)/σ_{i+1}; ``x ← x̂ + ½(σ_{i+1} − σ̂)(d + d')``. SC carries D₁
    (spec §8.6); ``refined`` adds a third call at the new state with SC input D₁. Then the final call and
    threshold as in :func:`sample_ddim`. Calls: (N − 1)·(2 or 3) + 1.
    """
    _check_mode(sc_mode)
    s = _grid(sigmas)
    gammas = churn_gammas(s, gamma, window)
    f = CallCounter(denoiser)
    batch, device = latents.shape[0], latents.device
    x = center + s[0] * latents.to(torch.float32)
    x0_hat = None
    for i in range(len(s) - 1):
        eps = randn_like(x) if gamma > 0 else None
        x_hat, sigma_hat = _churn(x, s[i], gammas[i], eps, s_noise)
        label = ati_shift(sigma_hat, s[i - 1] if i > 0 else None, eta)
        D1 = torch.sigmoid(f(x_hat, _label(label, batch, device), x0_hat).float())
        d_cur = (x_hat - D1) / sigma_hat
        x_pred = x_hat + (s[i + 1] - sigma_hat) * d_cur
        sc = D1 if sc_mode != "none" else None
        # The predictor moved from the churned σ̂, so σ̂ (not σ_i) is the noisier ATI reference.
        next_label = _label(ati_shift(s[i + 1], sigma_hat, eta), batch, device)
        D2 = torch.sigmoid(f(x_pred, next_label, sc).float())
        d_next = (x_pred - D2) / s[i + 1]
        x = x_hat + (0.5 * (s[i + 1] - sigma_hat)) * (d_cur + d_next)
        if sc_mode == "carry":
            x0_hat = D1
        elif sc_mode == "refined":
            x0_hat = torch.sigmoid(f(x, next_label, D1).float())
    return _final(f, x, s, x0_hat, eta, threshold, gammas)


def _final(f: CallCounter, x, s, x0_hat, eta, threshold, gammas) -> SampleOutput:
    """Final denoising call at the terminal σ (no churn) and the strict threshold (spec §8.2, §8.8)."""
    label = ati_shift(s[-1], s[-2], eta)
    probs = torch.sigmoid(f(x, _label(label, x.shape[0], x.device), x0_hat).float())
    bits = (probs > threshold).to(torch.uint8)
    return SampleOutput(bits=bits, probs=probs, x=x, nfe=f.calls, gammas=gammas)


INTEGRATORS = {"ddim": sample_ddim, "heun": sample_heun}


# ---------------------------------------------------------------------------------------------------
# From a config spec to a grid and knobs


def spec_with_defaults(spec: dict, where: str = "sampler spec") -> dict:
    """A ``sampler_spec`` with the schema defaults filled in; unknown keys and bad values are errors."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(_SPEC_KEYS)}")
    for key in ("sampler", "nfe"):
        if key not in spec:
            raise ValueError(f"{where}: missing required key '{key}'")
    out = {**SPEC_DEFAULTS, **spec}
    if out["sampler"] not in SAMPLERS:
        raise ValueError(f"{where}: sampler {out['sampler']!r} is not one of {sorted(SAMPLERS)}")
    if out["sc_mode"] not in SC_MODES:
        raise ValueError(f"{where}: sc_mode {out['sc_mode']!r} is not one of {list(SC_MODES)}")
    if out["window"] not in WINDOWS:
        raise ValueError(f"{where}: window {out['window']!r} is not one of {list(WINDOWS)}")
    if not isinstance(out["nfe"], int) or out["nfe"] < 2:
        raise ValueError(f"{where}: nfe must be an integer >= 2, got {out['nfe']!r}")
    if not 0 <= out["gamma"] <= GAMMA_MAX + 1e-9:
        raise ValueError(f"{where}: gamma must be in [0, {GAMMA_MAX:.8f}], got {out['gamma']}")
    if not 0 <= out["q_lo"] <= out["q_hi"] <= 1:
        raise ValueError(f"{where}: need 0 <= q_lo <= q_hi <= 1, got q_lo={out['q_lo']}, q_hi={out['q_hi']}")
    if not 0 < out["terminal_sigma"] < out["sigma_max"]:
        raise ValueError(f"{where}: need 0 < terminal_sigma < sigma_max, got {out['terminal_sigma']}, "
                         f"{out['sigma_max']}")
    if not 0 <= out["eta"] <= 1:
        raise ValueError(f"{where}: eta must be in [0, 1], got {out['eta']}")
    if not 0 < out["threshold"] < 1:
        raise ValueError(f"{where}: threshold must be in (0, 1), got {out['threshold']}")
    for key in ("num_samples", "micro_batch"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise ValueError(f"{where}: {key} must be an integer >= 1, got {out[key]!r}")
    for key in ("s_noise", "s_tmin", "s_tmax", "sigma_max", "rho", "terminal_sigma"):
        if isinstance(out[key], bool) or not isinstance(out[key], (int, float)) or not math.isfinite(out[key]) \
                or out[key] < 0:
            raise ValueError(f"{where}: {key} must be a finite number >= 0, got {out[key]!r}")
    return out


def calls_per_step(method: str, sc_mode: str) -> int:
    """Network calls per grid interval: DDIM 1, Heun 2, +1 for refined self-conditioning (spec §8.5)."""
    return {"ddim": 1, "heun": 2}[method] + (sc_mode == "refined")


def grid_points_for_nfe(nfe: int, method: str, sc_mode: str, where: str = "sampler spec") -> int:
    """Grid size N with exactly ``nfe`` calls: ``c·(N − 1) + 1 = nfe`` (honest NFE, spec §8.5)."""
    c = calls_per_step(method, sc_mode)
    steps, rest = divmod(nfe - 1, c)
    if rest or steps < 1:
        lower, upper = c * max(steps, 1) + 1, c * (steps + 1) + 1
        options = f"{lower} or {upper}" if lower < nfe else f"{upper}"
        raise ValueError(f"{where}: nfe {nfe} is not reachable with {method} + sc_mode {sc_mode} "
                         f"({c} network call(s) per step + 1 final call); use nfe {options}")
    return steps + 1


@dataclass(frozen=True)
class SamplerPlan:
    """Everything a run of one spec needs: the σ grid and the knobs (see :func:`plan_from_spec`)."""

    sampler: str
    method: str               # ddim | heun
    grid: str                 # entropic | karras
    sigmas: torch.Tensor      # [N] float64, strictly descending, sigmas[-1] = terminal σ
    nfe: int                  # network calls per trajectory (honest)
    gamma: float
    s_noise: float
    window: str               # full | fixed | entropy_cdf
    window_lo: float          # churn band in σ units, clamped into [terminal σ, σ_max]
    window_hi: float
    q_lo: float
    q_hi: float
    sc_mode: str
    eta: float
    terminal_sigma: float
    threshold: float

    @property
    def num_points(self) -> int:
        return int(self.sigmas.numel())

    def sampler_kwargs(self) -> dict:
        return dict(gamma=self.gamma, window=(self.window_lo, self.window_hi), s_noise=self.s_noise,
                    sc_mode=self.sc_mode, eta=self.eta, threshold=self.threshold)

    def metadata(self) -> dict:
        """Flat, parquet-friendly description (the sample file's generation columns)."""
        d = {k: v for k, v in asdict(self).items() if k != "sigmas"}
        d.update(grid_points=self.num_points, sigma_start=float(self.sigmas[0]),
                 sigma_end=float(self.sigmas[-1]))
        return d


def _load_schedule(entropy_dir, why: str):
    """``EntropySchedule.from_dir`` with a hard, named error when the tables are missing (spec §5.4)."""
    from bitstream.schedule import EntropySchedule

    if entropy_dir is None:
        raise FileNotFoundError(f"{why} needs the entropy tables ({', '.join(ENTROPY_FILES)}), but no "
                                f"entropy directory was given (--entropy-dir)")
    path = Path(entropy_dir)
    missing = [name for name in ENTROPY_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: entropy tables missing ({', '.join(missing)}); {why} builds on "
                                f"them (spec §5.4/§5.5) — there is no silent fallback. Train the model "
                                f"(it always writes them) or point --entropy-dir at a directory holding "
                                f"{', '.join(ENTROPY_FILES)}.")
    return EntropySchedule.from_dir(path)


def plan_from_spec(spec: dict, entropy_dir=None, schedule=None, where: str = "sampler spec") -> SamplerPlan:
    """Grid and knobs of one ``sampler_spec`` (spec §5.4, §5.5, §8; Appendix A.4).

    * N grid points with exactly ``nfe`` calls (:func:`grid_points_for_nfe`).
    * ``*_entropic``: ``schedule.sigma_grid(N, terminal_sigma, sigma_max)`` (entropic grid, top σ =
      the largest table midpoint, 76.756 for the released tables); ``*_karras``:
      ``karras_grid(N, terminal_sigma, sigma_max, rho)``.
    * churn window: ``full`` = [terminal σ, σ_max], ``fixed`` = [s_tmin, s_tmax], ``entropy_cdf`` =
      [σ(q_lo), σ(q_hi)] (``sigma_at_quantile``), then clamped into [terminal σ, σ_max] (spec §8.3).

    Tables come from ``schedule`` (an ``EntropySchedule``) or ``entropy_dir``. Missing tables are a hard
    error for the entropic samplers and for an ``entropy_cdf`` window with churn on; a Karras sampler
    with a ``full``/``fixed`` window (or γ = 0) needs none.
    """
    spec = spec_with_defaults(spec, where)
    method, grid_kind = SAMPLERS[spec["sampler"]]
    n = grid_points_for_nfe(spec["nfe"], method, spec["sc_mode"], where)
    terminal, sigma_max, gamma = float(spec["terminal_sigma"]), float(spec["sigma_max"]), float(spec["gamma"])
    needs_tables = grid_kind == "entropic" or (spec["window"] == "entropy_cdf" and gamma > 0)
    if needs_tables and schedule is None:
        why = (f"sampler {spec['sampler']}" if grid_kind == "entropic"
               else f"the entropy_cdf churn window of {spec['sampler']} (use window: full or fixed to "
                    f"sample a Karras grid without tables)")
        schedule = _load_schedule(entropy_dir, f"{where}: {why}")

    if grid_kind == "entropic":
        sigmas = schedule.sigma_grid(n, sigma_min=terminal, sigma_max=sigma_max)
    else:
        from bitstream.schedule import karras_grid

        sigmas = karras_grid(n, sigma_min=terminal, sigma_max=sigma_max, rho=float(spec["rho"]))
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    _grid(sigmas)  # validates: descending, positive, N >= 2
    if sigmas.numel() != n:
        raise ValueError(f"{where}: σ grid has {sigmas.numel()} points, expected {n}")

    if spec["window"] == "full":
        lo, hi = terminal, sigma_max
    elif spec["window"] == "fixed":
        lo, hi = float(spec["s_tmin"]), float(spec["s_tmax"])
    elif schedule is not None:
        lo, hi = float(schedule.sigma_at_quantile(spec["q_lo"])), float(schedule.sigma_at_quantile(spec["q_hi"]))
    else:  # entropy_cdf without tables is only allowed when γ = 0: the window is never used
        lo, hi = terminal, sigma_max
    lo, hi = max(lo, terminal), min(hi, sigma_max)

    return SamplerPlan(
        sampler=spec["sampler"], method=method, grid=grid_kind, sigmas=sigmas, nfe=int(spec["nfe"]),
        gamma=gamma, s_noise=float(spec["s_noise"]), window=spec["window"], window_lo=lo, window_hi=hi,
        q_lo=float(spec["q_lo"]), q_hi=float(spec["q_hi"]), sc_mode=spec["sc_mode"], eta=float(spec["eta"]),
        terminal_sigma=terminal, threshold=float(spec["threshold"]),
    )


def run_plan(plan: SamplerPlan, denoiser: Denoiser, latents: torch.Tensor,
             randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> SampleOutput:
    """Run one micro-batch of a plan; checks that the calls made equal the plan's NFE."""
    out = INTEGRATORS[plan.method](denoiser, latents, plan.sigmas, randn_like=randn_like, **plan.sampler_kwargs())
    if out.nfe != plan.nfe:  # cannot happen unless the integrators and grid_points_for_nfe disagree
        raise RuntimeError(f"{plan.sampler}: made {out.nfe} network calls, planned {plan.nfe}")
    return out


# ---------------------------------------------------------------------------------------------------
# The model as a denoiser


def model_denoiser(model, mode: str = "matched_filter_residual", clip: float = 30.0,
                   autocast: bool | None = None) -> Denoiser:
    """SDT + matched filter as a sampler denoiser (spec §3): fp32 logits from ``diffusion.denoise_logits``.

    On CUDA the network runs under bf16 autocast (``autocast=None`` -> on for CUDA, off elsewhere) while
    the sampler state stays fp32; the filter is computed from the fp32 state and the logits are
    returned as fp32 (upstream adds the filter in bf16, spec §14.3).
    """
    from bitstream.diffusion import denoise_logits

    def denoiser(x, sigma_label, x0_hat):
        use_amp = (x.device.type == "cuda") if autocast is None else autocast
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = denoise_logits(model, x, sigma_label, x0_hat, mode=mode, clip=clip)
        return logits.float()

    return denoiser
