"""Training data: seeds, the split files, and the deterministic order of global batches (spec §13).

Nothing here knows about diffusion: rows of a token cache go in, ids (or bits) of one rank's slice of
a global batch come out, as a function of the step alone — so a resumed run and a run on any number
of processes see the same rows. An autoregressive reference trained on the same cache reuses it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from bitstream.bits import check_width, ids_to_bits

# Seeds: one integer seed, independent named streams

_STREAMS = {"data": 1, "sigma": 2, "noise": 3, "dropout": 4, "validation": 5}


def derive_seed(seed: int, stream: str, *more: int) -> int:
    """A 63-bit seed for the named stream (``numpy.random.SeedSequence`` mixing, no overlap)."""
    words = [int(seed) % 2**64, _STREAMS[stream], *[int(m) for m in more]]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


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


def rows_to_ids(rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of a uint16 memmap as int64 ids ``[b, L]``, read in file order."""
    order = np.argsort(idx, kind="stable")
    ids = np.empty((len(idx), rows.shape[1]), dtype=np.int64)
    ids[order] = rows[idx[order]]
    return ids


def rows_to_bits(rows: np.ndarray, idx: np.ndarray, bits: int, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` of a uint16 memmap -> float32 0/1 bits ``[b, L·bits]`` on ``device`` (spec §1.2)."""
    return torch.from_numpy(ids_to_bits(rows_to_ids(rows, idx), bits)).to(device=device, dtype=torch.float32)
