"""Bit codec (spec §1.2) and unigram entropy (spec §9.3): round trips, bit order, closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bitstream.bits import bits_to_ids, check_width, ids_to_bits, required_width
from bitstream.entropy import per_sample_unigram_entropy, unigram_entropy


@pytest.mark.parametrize("width", range(1, 21))
def test_round_trip_every_width_numpy_and_torch(width):
    rng = np.random.default_rng(width)
    ids = rng.integers(0, 2**width, size=(3, 7), dtype=np.int64)
    ids[0, 0], ids[0, 1] = 0, 2**width - 1  # both extremes
    bits = ids_to_bits(ids, width)
    assert bits.shape == (3, 7 * width) and bits.dtype == np.uint8 and set(np.unique(bits)) <= {0, 1}
    np.testing.assert_array_equal(bits_to_ids(bits, width), ids)

    t = torch.from_numpy(ids)
    tbits = ids_to_bits(t, width)
    assert isinstance(tbits, torch.Tensor) and tbits.dtype == torch.uint8
    np.testing.assert_array_equal(tbits.numpy(), bits)  # numpy and torch agree bit for bit
    assert torch.equal(bits_to_ids(tbits, width), t)


def test_msb_first_token_major():
    # 5 = 101b, 6 = 110b, width 4: token 0 -> 0101, token 1 -> 0110, concatenated token-major.
    np.testing.assert_array_equal(ids_to_bits(np.array([5, 6]), 4), [0, 1, 0, 1, 0, 1, 1, 0])
    # Column j holds (t >> (m-1-j)) & 1 for every id of a width-11 vocabulary.
    ids = np.arange(2**11)
    bits = ids_to_bits(ids[None, :], 11).reshape(-1, 11)
    for j in range(11):
        np.testing.assert_array_equal(bits[:, j], (ids >> (10 - j)) & 1)


def test_width_checks():
    assert required_width(2000) == 11 and required_width(2048) == 11 and required_width(2049) == 12
    check_width(4096, 12)
    with pytest.raises(ValueError, match="2049 ids does not fit 11 bits"):
        check_width(2049, 11)
    with pytest.raises(ValueError, match="out of range"):
        ids_to_bits(np.array([8]), 3)


def test_unigram_entropy_closed_forms():
    assert unigram_entropy([[1, 1, 2, 3]]) == pytest.approx(1.5 * math.log(2))
    assert unigram_entropy([[7] * 50]) == 0.0
    for k in (2, 5, 17):
        assert unigram_entropy([list(range(k)) * 3]) == pytest.approx(math.log(k))
    # mean over samples, not the entropy of pooled counts
    assert unigram_entropy([[1, 1, 2, 3], [5, 5]]) == pytest.approx(0.75 * math.log(2))
    # an empty sample has entropy 0 and still counts
    np.testing.assert_allclose(per_sample_unigram_entropy([[], [0, 1]]), [0.0, math.log(2)])


def test_unigram_entropy_2d_equals_ragged_and_brute_force():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 50, size=(64, 32))
    brute = []
    for r in rows:
        _, c = np.unique(r, return_counts=True)
        p = c / c.sum()
        brute.append(-(p * np.log(p)).sum())
    np.testing.assert_allclose(per_sample_unigram_entropy(rows), brute)
    np.testing.assert_allclose(per_sample_unigram_entropy([list(r) for r in rows]), brute)
    assert unigram_entropy(rows) == pytest.approx(np.mean(brute))
