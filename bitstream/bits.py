"""Token ids <-> fixed-width bit codes (spec §1.2).

The code of token ``t`` is ``t`` itself written MSB first in ``width`` bits ("raw_binary"); a row of
``L`` ids becomes ``L * width`` bits, token-major: ``bits[k*width + j]`` is bit ``j`` of token ``k``,
with bit 0 the most significant. Works on numpy arrays and torch tensors of any leading shape.
"""

from __future__ import annotations

import numpy as np

MAX_WIDTH = 20


def required_width(vocab_size: int) -> int:
    """Smallest ``m`` with ``2**m >= vocab_size``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, int(vocab_size - 1).bit_length())


def check_width(vocab_size: int, width: int, where: str = "bits") -> None:
    """Fail with a clear message when the vocabulary does not fit ``width`` bits."""
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"{where}: bit width must be in 1..{MAX_WIDTH}, got {width}")
    if 2**width < vocab_size:
        raise ValueError(
            f"{where}: a vocabulary of {vocab_size} ids does not fit {width} bits "
            f"(2**{width} = {2**width}); use bits >= {required_width(vocab_size)} or a smaller vocabulary"
        )


def _shifts(width: int, like):
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"bit width must be in 1..{MAX_WIDTH}, got {width}")
    return np.arange(width - 1, -1, -1, dtype=np.int64)


def ids_to_bits(ids, width: int):
    """``[..., L]`` integer ids -> ``[..., L*width]`` 0/1 bits (uint8 for numpy, same device for torch)."""
    shifts = _shifts(width, ids)
    if _is_torch(ids):
        import torch

        if ids.is_floating_point():
            raise TypeError("ids_to_bits expects integer ids, got a floating tensor")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 2**width):
            raise ValueError(f"ids out of range for {width} bits: min {int(ids.min())}, max {int(ids.max())}")
        s = torch.as_tensor(shifts, device=ids.device)
        bits = (ids.long().unsqueeze(-1) >> s) & 1
        return bits.reshape(*ids.shape[:-1], ids.shape[-1] * width).to(torch.uint8)
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids_to_bits expects integer ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or int(ids.max()) >= 2**width):
        raise ValueError(f"ids out of range for {width} bits: min {ids.min()}, max {ids.max()}")
    bits = (ids.astype(np.int64)[..., None] >> shifts) & 1
    return bits.reshape(*ids.shape[:-1], ids.shape[-1] * width).astype(np.uint8)


def bits_to_ids(bits, width: int):
    """``[..., L*width]`` 0/1 bits -> ``[..., L]`` int64 ids (inverse of :func:`ids_to_bits`)."""
    shifts = _shifts(width, bits)
    n = bits.shape[-1]
    if n % width:
        raise ValueError(f"bit length {n} is not a multiple of the width {width}")
    if _is_torch(bits):
        import torch

        s = torch.as_tensor(shifts, device=bits.device)
        b = bits.reshape(*bits.shape[:-1], n // width, width).long()
        return (b << s).sum(-1)
    bits = np.asarray(bits)
    b = bits.reshape(*bits.shape[:-1], n // width, width).astype(np.int64)
    return (b << shifts).sum(-1)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")
