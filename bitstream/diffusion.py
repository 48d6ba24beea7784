"""VE diffusion on 0/1 bits: preconditioning, the matched filter, the loss and the base σ samplers.

Spec §2-§4. The clean state is the bit itself as a float (no ±1 map, §1.3); the forward process is
variance exploding, ``x_σ = x0 + σ·ε`` (§2). Of the EDM preconditioning only ``c_in`` and ``c_noise``
are used: the network emits a *logit*, the "skip" role is played by the analytic matched filter (§3)
and the output nonlinearity is a sigmoid, so there is no ``c_skip`` / ``c_out``.

σ_d (sigma_data) is fixed at 0.5, the std of a fair bit. Upstream overwrote it on rank 0 only with
an estimate from the training bits (spec §14.1); evaluation (and hence every reported number) uses 0.5,
so we use 0.5 everywhere (spec §14.1, recommendation).

Everything that touches probabilities or losses is computed in float32, whatever autocast says:
the matched filter reaches ±30 and ``sigmoid`` saturates at |ℓ| ≈ 17 in float32, so bf16 would lose
the low-σ end (spec §14.3 — upstream added the filter in bf16; we add it in float32).

Randomness always comes from an explicit ``torch.Generator`` so callers (training, VLB, samplers)
control the streams.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

SIGMA_DATA = 0.5    # σ_d: std of a fair bit (spec §2, §14.1)
DATA_CENTER = 0.5   # c: the bits are centred by subtracting 0.5 (spec §1.3)
MF_CLIP = 30.0      # matched-filter clip (spec §3)
LOGIT_MODES = ("matched_filter_residual", "none", "matched_filter_only")
WEIGHTINGS = ("edm", "unit")
SIGMA_SAMPLERS = ("log_normal", "log_uniform")


def _per_example(sigma, like: torch.Tensor) -> torch.Tensor:
    """σ as a float32 tensor that broadcasts against ``like`` [B, ...]: a scalar, [B] or already [B, 1...]."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
    if sigma.ndim == 1 and like.ndim > 1 and sigma.shape[0] == like.shape[0]:
        sigma = sigma.view(-1, *([1] * (like.ndim - 1)))
    return sigma.float()


# --------------------------------------------------------------------------------------------------
# Forward process and (partial) EDM preconditioning, spec §2
# --------------------------------------------------------------------------------------------------

def c_in(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Input scale ``c_in(σ) = 1/sqrt(σ² + σ_d²)`` (spec §2), same shape as ``sigma``."""
    sigma = torch.as_tensor(sigma).float()
    return torch.rsqrt(sigma * sigma + sigma_data**2)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Noise label ``c_noise(σ) = ln σ`` (natural log, no ¼ factor; spec §2)."""
    return torch.as_tensor(sigma).float().log()


def add_noise(x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """VE forward process ``x_σ = x0 + σ·ε`` (spec §2); ``sigma`` is [B] (per example) or a scalar."""
    return x0.float() + _per_example(sigma, x0) * noise.float()


# --------------------------------------------------------------------------------------------------
# Matched filter and the denoiser logit, spec §3
# --------------------------------------------------------------------------------------------------

def matched_filter_logit(x: torch.Tensor, sigma, center: float = DATA_CENTER, scale: float = 1.0,
                         clip: float = MF_CLIP) -> torch.Tensor:
    """Clipped log-odds of an isolated uniform bit observed as ``x = b + σε`` (spec §3).

    ``log p(x|b=1) − log p(x|b=0) = (x − ½)/σ²``, so ``sigmoid`` of it is ``E[b | x]`` exactly for
    independent uniform bits. Computed in float32 from the *uncentred* state:
    ``clip(scale·(x − center)/max(σ², 1e-12), −clip, +clip)``. ``sigma`` may be a scalar, [B] (one per
    row of ``x``) or any shape that broadcasts against ``x``.
    """
    x = x.float()
    sigma = _per_example(sigma, x)
    mf = scale * (x - center) / torch.clamp(sigma * sigma, min=1e-12)
    return torch.clamp(mf, -clip, clip)


def denoise_logits(net: Callable, x: torch.Tensor, sigma: torch.Tensor, x0_hat: torch.Tensor | None = None,
                   mode: str = "matched_filter_residual", clip: float = MF_CLIP) -> torch.Tensor:
    """The final bit logit ℓ (float32, [B, S]) — the one wrapper used everywhere (spec §3).

    * ``matched_filter_residual`` (paper): ``ℓ = r(x, σ, x̂0) + mf(x, σ)``, added in logit space in
      float32 (upstream added in bf16 under autocast, §14.3).
    * ``none`` (ablation): ``ℓ = r``.
    * ``matched_filter_only``: ``ℓ = mf``; the network is not called.

    ``net(x, sigma, x0_hat) -> r [B, S]`` is the SDT (or a DDP wrapper of it); ``sigma`` is [B] (a scalar
    is expanded to [B]). ``x0_hat`` follows the project's self-conditioning convention: ``None`` means
    "absent" = all bits at probability 0.5 (contract; spec §7, §14.9).
    """
    if mode not in LOGIT_MODES:
        raise ValueError(f"logit_mode must be one of {LOGIT_MODES}, got {mode!r}")
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1)   # [B] (also from [B, 1])
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(f"denoise_logits: sigma must be a scalar or hold one value per row of x "
                         f"({x.shape[0]}), got {sigma.shape[0]} values")
    if mode == "matched_filter_only":
        return matched_filter_logit(x, sigma, clip=clip)
    r = net(x, sigma, x0_hat).float()
    if mode == "none":
        return r
    return r + matched_filter_logit(x, sigma, clip=clip)


# --------------------------------------------------------------------------------------------------
# Loss and weighting, spec §4.1-§4.2
# --------------------------------------------------------------------------------------------------

def edm_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """x0-space EDM weight ``λ(σ) = (σ² + σ_d²)/(σ²·σ_d²)`` (spec §4.1); ``= 4 + 1/σ²`` at σ_d = 0.5."""
    s2 = torch.as_tensor(sigma).float() ** 2
    return (s2 + sigma_data**2) / (s2 * sigma_data**2)


def loss_weight(sigma: torch.Tensor, weighting: str = "edm", sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Per-example weight: ``edm`` (paper) or ``unit`` (λ ≡ 1), float32, same shape as ``sigma``."""
    if weighting == "edm":
        return edm_weight(sigma, sigma_data)
    if weighting == "unit":
        return torch.ones_like(torch.as_tensor(sigma).float())
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def binary_sm_loss(logits: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, weighting: str = "edm",
                   sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Binary score matching (spec §4.1): ``mean_{b,i} λ(σ_b)·(sigmoid(ℓ_{b,i}) − x0_{b,i})²``.

    Plain mean over all B·S positions, float32. ``logits`` and ``x0`` are [B, S], ``sigma`` is [B].
    """
    logits, x0 = logits.float(), x0.float()
    w = _per_example(loss_weight(sigma, weighting, sigma_data), logits)
    return (w * (torch.sigmoid(logits) - x0) ** 2).mean()


def binary_ce_loss(logits: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, weighting: str = "edm",
                   sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """CE ablation (spec §4.1): ``mean_{b,i} λ(σ_b)·BCEWithLogits(ℓ_{b,i}, x0_{b,i})``, float32."""
    logits, x0 = logits.float(), x0.float()
    w = _per_example(loss_weight(sigma, weighting, sigma_data), logits)
    return (w * F.binary_cross_entropy_with_logits(logits, x0, reduction="none")).mean()


LOSSES = {"binary_sm": binary_sm_loss, "binary_ce": binary_ce_loss}


def token_ce_loss(logits: torch.Tensor, ids: torch.Tensor, sigma: torch.Tensor, weighting: str = "edm",
                  sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Token cross-entropy of the one-hot token baseline (spec §6.3, §10.2 "onehot_tokens_ce"):
    ``mean_{b,n} λ(σ_b)·CE(ℓ_{b,n,:}, id_{b,n})`` over all B·L positions, float32.

    ``logits`` [B, L, V] are the :class:`~bitstream.model.TokenSDT` outputs, ``ids`` [B, L] the clean
    token ids, ``sigma`` [B]. The same x0-space weight λ(σ) as the bit losses (§4.1). Upstream chunks
    the CE over 2048 rows to bound its float32 copy; without recomputing the head per chunk the saved
    log-probabilities are B·L·V either way, so we take one pass (the O(V) cost is what is measured).
    """
    if logits.ndim != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"token_ce_loss: expected logits [B, L, V] and ids [B, L], got {tuple(logits.shape)} "
                         f"and {tuple(ids.shape)}")
    ce = F.cross_entropy(logits.float().flatten(0, 1), ids.long().flatten(), reduction="none").view(ids.shape)
    w = _per_example(loss_weight(sigma, weighting, sigma_data), ce)
    return (w * ce).mean()


def per_example_mse(D: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Entropy-rate metric ``m_b = mean_i (D_{b,i} − x0_{b,i})²`` (spec §4.2), [B] float32, detached.

    ``D = sigmoid(ℓ)`` are the bit probabilities (filter included). Unweighted, for both losses; it only
    feeds the entropy schedule (§5), hence detached.
    """
    return ((D.detach().float() - x0.detach().float()) ** 2).flatten(1).mean(dim=1)


# --------------------------------------------------------------------------------------------------
# Base σ samplers, spec §4.3
# --------------------------------------------------------------------------------------------------

def _uniform(n: int, generator: torch.Generator) -> torch.Tensor:
    """n float64 uniforms in [0, 1) on the generator's device."""
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)


def sample_sigma_log_normal(n: int, p_mean: float, p_std: float, lo: float, hi: float,
                            generator: torch.Generator, device: torch.device | str | None = None) -> torch.Tensor:
    """``ln σ ~ N(p_mean, p_std²)`` truncated to ``[ln lo, ln hi]`` (spec §4.3), [n] float32.

    Upstream resamples (rejection) until σ ∈ [lo, hi]; that is exactly the truncated normal, which we
    draw by inverting its CDF (one uniform per draw, no unbounded loop): ``z = Φ⁻¹(Φ(a) + u·(Φ(b) −
    Φ(a)))``. Same distribution as upstream, different random stream. When the window lies in the
    right tail we invert the mirrored problem so that Φ does not round to 1 in float64.
    """
    if not 0 < lo < hi:
        raise ValueError(f"log-normal σ sampler needs 0 < sigma_min < sigma_max, got {lo}, {hi}")
    a = (math.log(lo) - p_mean) / p_std
    b = (math.log(hi) - p_mean) / p_std
    flip = a > 0                                # both bounds in the right tail: sample −z in [−b, −a]
    if flip:
        a, b = -b, -a
    u = _uniform(n, generator)
    ta = torch.special.ndtr(torch.tensor(a, dtype=torch.float64))
    tb = torch.special.ndtr(torch.tensor(b, dtype=torch.float64))
    z = torch.special.ndtri(ta + u.cpu() * (tb - ta)).clamp(a, b)
    if flip:
        z = -z
    ln_sigma = (p_mean + p_std * z).clamp(math.log(lo), math.log(hi))
    return ln_sigma.exp().float().to(device if device is not None else generator.device)


def sample_sigma_log_uniform(n: int, lo: float, hi: float, generator: torch.Generator,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """``ln σ ~ U[ln lo, ln hi]`` (spec §4.3, fallback sampler), [n] float32."""
    if not 0 < lo <= hi:
        raise ValueError(f"log-uniform σ sampler needs 0 < sigma_min <= sigma_max, got {lo}, {hi}")
    ln_lo, ln_hi = math.log(lo), math.log(hi)
    ln_sigma = ln_lo + _uniform(n, generator) * (ln_hi - ln_lo)
    return ln_sigma.exp().float().to(device if device is not None else generator.device)


def sample_sigma_base(n: int, sampler: str, generator: torch.Generator, *, p_mean: float = -1.2,
                      p_std: float = 1.2, sigma_min: float = 0.002, sigma_max: float = 80.0,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """The configured base sampler (``training.sigma_sampler``: log_normal | log_uniform), [n] float32."""
    if sampler == "log_normal":
        return sample_sigma_log_normal(n, p_mean, p_std, sigma_min, sigma_max, generator, device)
    if sampler == "log_uniform":
        return sample_sigma_log_uniform(n, sigma_min, sigma_max, generator, device)
    raise ValueError(f"sigma_sampler must be one of {SIGMA_SAMPLERS}, got {sampler!r}")
