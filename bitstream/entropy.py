"""Token-frequency (unigram) entropy of id sequences (spec §9.3).

For one sample with ids ``x_1..x_n``: ``H = -sum_v p_v ln p_v`` nats, ``p_v = count(v) / n``; the
reported number is the **mean over samples** of these per-sample entropies (not the entropy of the
pooled counts). Which ids go in is the caller's business (spec §9.3): LM1B -- all ``seq_len`` base
ids of a block, specials included; OWT -- the base ids after the inverse codec. A sample with no ids
has entropy 0 (nothing varies) and still counts in the mean -- a sampler that emits empty rows must
not look *more* diverse by having them skipped.

One implementation for the whole project: ``bitstream.metrics.unigram_entropy`` re-exports this one,
and ``bitstream.data_stats`` uses it for the real-data reference rows.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def per_sample_unigram_entropy(id_lists: Iterable[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Per-sample unigram entropy in nats, ``float64 [n_samples]``.

    Vectorised over all samples at once: every (sample, id) pair gets one integer key, ``np.unique``
    counts the keys, and the ``-p ln p`` terms are summed back per sample with ``np.bincount``.
    Accepts a 2-D integer array (equal lengths) or any iterable of integer sequences (ragged).
    """
    if isinstance(id_lists, np.ndarray) and id_lists.ndim == 2:
        n = id_lists.shape[0]
        lengths = np.full(n, id_lists.shape[1], dtype=np.int64)
        flat = id_lists.reshape(-1).astype(np.int64)
    else:
        arrays = [np.asarray(x, dtype=np.int64).reshape(-1) for x in id_lists]
        n = len(arrays)
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        flat = np.concatenate(arrays) if n else np.zeros(0, dtype=np.int64)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if flat.size == 0:
        return np.zeros(n, dtype=np.float64)
    if flat.min() < 0:
        raise ValueError(f"unigram_entropy: negative id {int(flat.min())}")
    sample = np.repeat(np.arange(n, dtype=np.int64), lengths)
    keys = sample * (int(flat.max()) + 1) + flat
    uniq, counts = np.unique(keys, return_counts=True)
    owner = uniq // (int(flat.max()) + 1)
    p = counts / lengths[owner]
    return np.bincount(owner, weights=-p * np.log(p), minlength=n)


def unigram_entropy(id_lists: Iterable[Sequence[int]] | np.ndarray) -> float:
    """Mean per-sample unigram entropy (nats) of a batch of id sequences (spec §9.3)."""
    h = per_sample_unigram_entropy(id_lists)
    if h.size == 0:
        raise ValueError("unigram_entropy: no samples")
    return float(h.mean())
