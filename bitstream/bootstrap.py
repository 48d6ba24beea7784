"""Paired bootstrap intervals for differences between two sampled systems (ablation table, issue 10).

Why paired: every sampler job draws sample ``i`` of seed ``s`` from its own noise stream
(``bitstream.samplers.SampleNoise(seed, i)``), so sample (s, i) of a variant and sample (s, i) of the
base model start from the same latent and see the same churn noise — common random numbers. Resampling
the *pairs* (the same indices for both systems) keeps that correlation and gives a much tighter, still
honest, interval on the difference than resampling the two systems independently.

The statistics are the table's own numbers, recomputed on every resample:

* GenPPL of a seed = ``exp(Σ text NLL / Σ scored tokens)`` over its samples (spec §9.2, corpus level),
  and the reported GenPPL = the mean of the per-seed values (Table 1's "mean over seeds");
* entropy = the mean over seeds of the mean per-sample unigram entropy (spec §9.3).

Resampling is stratified by seed: within each seed, ``n`` sample indices are drawn with replacement
(the seed structure — one sampler job per seed — is kept, and with three seeds a seed-level resample
would have only ten distinct outcomes). The interval is the percentile interval of
``stat(variant*) − stat(base*)`` over ``n_boot`` resamples. Identical inputs therefore give exactly
zero width. ``paired=False`` resamples the two systems independently (used for the AR reference,
whose samples share no noise with the diffusion model's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SeedScores", "Interval", "genppl_of", "entropy_of", "bootstrap_difference"]


@dataclass
class SeedScores:
    """Per-sample scores of one system for one seed, indexed by sample index."""

    nll: np.ndarray        # [n] summed judge NLL per text (nats); NaN = text skipped (< 2 judge tokens)
    tokens: np.ndarray     # [n] scored judge tokens per text (0 if skipped)
    entropy: np.ndarray    # [n] unigram entropy per sample (nats)

    def __post_init__(self):
        self.nll = np.asarray(self.nll, dtype=np.float64)
        self.tokens = np.asarray(self.tokens, dtype=np.float64)
        self.entropy = np.asarray(self.entropy, dtype=np.float64)
        if not (len(self.nll) == len(self.tokens) == len(self.entropy)):
            raise ValueError(f"per-sample score arrays differ in length: nll {len(self.nll)}, "
                             f"tokens {len(self.tokens)}, entropy {len(self.entropy)}")


@dataclass
class Interval:
    estimate: float   # stat(variant) − stat(base) on the data as observed
    lo: float
    hi: float
    n_boot: int
    paired: bool

    def covers(self, value: float) -> bool:
        return self.lo <= value <= self.hi


def _seed_genppl(nll: np.ndarray, tokens: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Corpus GenPPL of one seed for each row of resampled indices ``idx`` [B, n] -> [B]."""
    total = np.nansum(nll[idx], axis=-1)  # skipped texts contribute neither NLL nor tokens
    count = tokens[idx].sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.exp(total / count)


def genppl_of(seeds: list[SeedScores], indices: list[np.ndarray] | None = None) -> np.ndarray:
    """Mean over seeds of each seed's corpus GenPPL; ``indices[k]`` = [B, n_k] resampled indices."""
    if indices is None:
        indices = [np.arange(len(s.nll))[None, :] for s in seeds]
    return np.mean([_seed_genppl(s.nll, s.tokens, i) for s, i in zip(seeds, indices)], axis=0)


def entropy_of(seeds: list[SeedScores], indices: list[np.ndarray] | None = None) -> np.ndarray:
    if indices is None:
        indices = [np.arange(len(s.entropy))[None, :] for s in seeds]
    return np.mean([s.entropy[i].mean(axis=-1) for s, i in zip(seeds, indices)], axis=0)


STATISTICS = {"gen_ppl": genppl_of, "entropy": entropy_of}


def _draw(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, n, size=(n_boot, n))


def bootstrap_difference(variant: list[SeedScores], base: list[SeedScores], statistic: str = "gen_ppl",
                         n_boot: int = 2000, level: float = 0.95, paired: bool = True, seed: int = 0) -> Interval:
    """Percentile interval of ``stat(variant) − stat(base)`` (see the module docstring).

    ``variant[k]`` and ``base[k]`` are the same seed; when ``paired`` they must hold the same number of
    samples (sample i of one is the common-random-number twin of sample i of the other).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
    if not variant or not base:
        raise ValueError("bootstrap_difference needs at least one seed on each side")
    if paired and len(variant) != len(base):
        raise ValueError(f"paired bootstrap: {len(variant)} seeds of the variant vs {len(base)} of the base")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    stat = STATISTICS[statistic]
    rng = np.random.default_rng(seed)
    if paired:
        for k, (v, b) in enumerate(zip(variant, base)):
            if len(v.nll) != len(b.nll):
                raise ValueError(f"paired bootstrap: seed position {k} has {len(v.nll)} variant samples "
                                 f"but {len(b.nll)} base samples")
        idx = [_draw(len(v.nll), n_boot, rng) for v in variant]
        idx_v, idx_b = idx, idx
    else:
        idx_v = [_draw(len(v.nll), n_boot, rng) for v in variant]
        idx_b = [_draw(len(b.nll), n_boot, rng) for b in base]
    diffs = stat(variant, idx_v) - stat(base, idx_b)
    diffs = diffs[np.isfinite(diffs)]
    estimate = float(stat(variant)[0] - stat(base)[0])
    if len(diffs) == 0:
        return Interval(estimate, float("nan"), float("nan"), n_boot, paired)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return Interval(estimate, float(lo), float(hi), n_boot, paired)
