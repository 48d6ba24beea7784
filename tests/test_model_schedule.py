"""Entropy-rate schedule, its tables and σ grids (spec §4.4, §5, A.2-A.3), incl. the paper's released tables."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from bitstream import schedule as sch

REFERENCE = Path(os.environ.get("BITSTREAM_SHARED_REFERENCE",
                                Path(__file__).resolve().parents[2] / "shared" / "reference")) / "entropy_tables"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "lm1b").is_dir(),
    reason=f"the paper's released entropy tables are not available at {REFERENCE} (shared reference data, "
           f"not part of the repository)")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def synthetic_buffer(n=20_000, seed=0):
    """(σ, m) pairs with a bell-shaped rate: m = mmse of a fair bit-like curve."""
    g = gen(seed)
    sigma = torch.exp(torch.empty(n).uniform_(math.log(0.002), math.log(80.0), generator=g))
    mse = 0.25 * sigma**2 / (sigma**2 + 0.25) * (1 + 0.1 * torch.rand(n, generator=g))
    return sigma, mse


# ---- §4.4 mixing ----------------------------------------------------------------------------------

def test_mixing_gamma_ramp():
    assert sch.mixing_gamma(0, 40_000, 10_000, 1.0) == 0.0
    assert sch.mixing_gamma(39_999, 40_000, 10_000, 1.0) == 0.0
    assert sch.mixing_gamma(40_000, 40_000, 10_000, 1.0) == 0.0
    assert sch.mixing_gamma(45_000, 40_000, 10_000, 1.0) == pytest.approx(0.5)
    assert sch.mixing_gamma(50_000, 40_000, 10_000, 0.8) == pytest.approx(0.8)
    assert sch.mixing_gamma(10**6, 40_000, 10_000, 1.0) == 1.0
    assert sch.mixing_gamma(5, 5, 0, 0.7) == pytest.approx(0.7)


# ---- §5.2 buffer ----------------------------------------------------------------------------------

def test_entropy_buffer_keeps_the_newest_pairs_and_round_trips():
    buf = sch.EntropyBuffer(5)
    buf.push(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.1, 0.2, 0.3]))
    assert len(buf) == 3
    buf.push(torch.tensor([4.0, 5.0, 6.0, 7.0]), torch.tensor([0.4, 0.5, 0.6, 0.7]))
    assert len(buf) == 5
    sigma, mse = buf.data()
    torch.testing.assert_close(sigma, torch.tensor([3.0, 4.0, 5.0, 6.0, 7.0]))
    torch.testing.assert_close(mse, torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7]))
    buf.push(torch.arange(10.0, 22.0), torch.zeros(12))          # more than the capacity at once
    torch.testing.assert_close(buf.data()[0], torch.arange(17.0, 22.0))

    state = buf.state_dict()
    other = sch.EntropyBuffer(5)
    other.load_state_dict(state)
    assert len(other) == 5 and torch.equal(other.data()[0], buf.data()[0])
    smaller = sch.EntropyBuffer(2)
    smaller.load_state_dict(state)
    torch.testing.assert_close(smaller.data()[0], torch.tensor([20.0, 21.0]))
    with pytest.raises(ValueError, match="differ"):
        buf.push(torch.ones(2), torch.ones(3))


# ---- §5.2 / A.2 rebuild ---------------------------------------------------------------------------

def test_rebuilt_tables_are_a_valid_histogram():
    sigma, mse = synthetic_buffer()
    t = sch.rebuild_entropy_tables(sigma, mse, num_bins=32)
    assert [tuple(getattr(t, k).shape) for k in sch.TABLE_NAMES] == [(32,), (32,), (32,), (33,)]
    assert all(getattr(t, k).dtype == torch.float32 for k in sch.TABLE_NAMES)
    assert (t.pdf >= 0).all() and t.pdf.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (t.cdf[1:] >= t.cdf[:-1]).all() and t.cdf[-1].item() == 1.0
    log_edges = t.edges.double().log()
    torch.testing.assert_close(log_edges[[0, -1]], torch.tensor([math.log(0.002), math.log(80.0)], dtype=torch.float64))
    torch.testing.assert_close(log_edges.diff(), torch.full((32,), math.log(40_000) / 32, dtype=torch.float64))
    torch.testing.assert_close(t.sigmas, (t.edges[:-1] * t.edges[1:]).sqrt())


def test_rebuild_matches_the_formula_and_the_regulariser_suppresses_low_sigma():
    # constant rate ρ = m/σ² = 1 in every bin -> pdf ∝ g(σ_mid) (target "rate"), √ for "sqrt-rate"
    sigma = torch.exp(torch.linspace(math.log(0.0021), math.log(79.0), 4000))
    t = sch.rebuild_entropy_tables(sigma, sigma**2, num_bins=16, c=0.1, n=3, target="rate")
    mid = t.sigmas.double()
    g = mid**3 / (mid**3 + 0.1**3)
    torch.testing.assert_close(t.pdf.double(), g / g.sum(), rtol=1e-5, atol=1e-9)
    assert t.pdf[0] < 1e-4 * t.pdf[-1]                            # σ ≈ 0.003 vs σ ≈ 56
    # a rate 4× larger in the top half: sqrt-rate doubles, rate quadruples the mass relative to g
    mse = sigma**2 * torch.where(sigma > 0.4, 4.0, 1.0)
    for target, factor in (("rate", 4.0), ("sqrt-rate", 2.0), (0.25, math.sqrt(2.0))):
        p = sch.rebuild_entropy_tables(sigma, mse, num_bins=16, target=target).pdf.double()
        ratio = (p / g)[-1] / (p / g)[0]
        assert ratio.item() == pytest.approx(factor, rel=1e-4)


def test_rebuild_empty_bins_and_degenerate_input():
    sigma = torch.full((100,), 1.0)                               # only one bin populated
    t = sch.rebuild_entropy_tables(sigma, torch.full((100,), 0.1), num_bins=8)
    assert (t.pdf > 0).sum() == 1 and t.pdf.max().item() == 1.0 and t.cdf[-1] == 1.0
    u = sch.rebuild_entropy_tables(sigma, torch.zeros(100), num_bins=8)   # zero rate everywhere
    torch.testing.assert_close(u.pdf, torch.full((8,), 1 / 8))
    empty = sch.rebuild_entropy_tables(torch.zeros(0), torch.zeros(0), num_bins=8)
    torch.testing.assert_close(empty.pdf, torch.full((8,), 1 / 8))
    assert empty.cdf[-1].item() == 1.0
    with pytest.raises(ValueError, match="target"):
        sch.rebuild_entropy_tables(sigma, sigma, target="log-rate")


# ---- files ----------------------------------------------------------------------------------------

def test_save_from_dir_round_trip_in_the_released_format(tmp_path):
    t = sch.rebuild_entropy_tables(*synthetic_buffer(), num_bins=24)
    t.save(tmp_path / "entropy")
    for name in sch.TABLE_NAMES:
        raw = torch.load(tmp_path / "entropy" / f"entropy_{name}.pt", weights_only=True)
        assert isinstance(raw, torch.Tensor) and raw.dtype == torch.float32 and raw.ndim == 1
        assert raw.device.type == "cpu" and raw.untyped_storage().nbytes() == raw.numel() * 4
    back = sch.EntropySchedule.from_dir(tmp_path / "entropy")
    for name in sch.TABLE_NAMES:
        assert torch.equal(getattr(back, name), getattr(t, name))
    assert not list((tmp_path / "entropy").glob(".*tmp"))


def test_from_dir_names_the_bad_file(tmp_path):
    t = sch.rebuild_entropy_tables(*synthetic_buffer(), num_bins=8)
    t.save(tmp_path)
    torch.save(torch.zeros(7), tmp_path / "entropy_cdf.pt")
    with pytest.raises(ValueError, match="entropy_cdf.pt"):
        sch.EntropySchedule.from_dir(tmp_path)
    torch.save({"not": "a tensor"}, tmp_path / "entropy_cdf.pt")
    with pytest.raises(ValueError, match="entropy_cdf.pt"):
        sch.EntropySchedule.from_dir(tmp_path)
    t.save(tmp_path)
    (tmp_path / "entropy_edges.pt").unlink()
    with pytest.raises(FileNotFoundError, match="entropy_edges.pt"):
        sch.EntropySchedule.from_dir(tmp_path)


# ---- A.3 draws ------------------------------------------------------------------------------------

def test_table_draw_follows_the_pdf_and_never_hits_dead_bins():
    sigma, mse = synthetic_buffer()
    mse[sigma < 0.1] = 0.0                                        # dead low-σ bins, like the released tables
    t = sch.rebuild_entropy_tables(sigma, mse, num_bins=16)
    n = 40_000
    draw = t.sample(n, gen(0))
    assert draw.min() >= 0.002 and draw.max() <= 80.0
    k = (torch.bucketize(draw.double().log(), t.edges.double().log()) - 1).clamp(0, 15)
    freq = torch.bincount(k, minlength=16).double() / n
    assert (freq[t.pdf == 0] == 0).all()
    torch.testing.assert_close(freq, t.pdf.double(), atol=0.01, rtol=0)
    # the dead-bin floor: a fraction ε drawn log-uniformly over the whole range revives every bin
    floored = t.sample(n, gen(0), floor=0.1)
    kf = (torch.bucketize(floored.double().log(), t.edges.double().log()) - 1).clamp(0, 15)
    freq_f = torch.bincount(kf, minlength=16).double() / n
    torch.testing.assert_close(freq_f, 0.9 * t.pdf.double() + 0.1 / 16, atol=0.01, rtol=0)
    assert (freq_f > 0).all()
    assert torch.equal(t.sample(50, gen(3)), t.sample(50, gen(3)))
    clamped = t.sample(n, gen(1), sigma_min=0.5, sigma_max=5.0)
    assert clamped.min() >= 0.5 * (1 - 1e-6) and clamped.max() <= 5.0 * (1 + 1e-6)


def test_draw_training_sigma_switches_from_base_to_table():
    sigma = torch.full((200,), 30.0)
    t = sch.rebuild_entropy_tables(sigma, sigma**2, num_bins=32)   # all mass in one bin around σ = 30
    lo, hi = float(t.edges[t.pdf.argmax()]), float(t.edges[t.pdf.argmax() + 1])
    training = {"sigma_sampler": "log_normal", "p_mean": -1.2, "p_std": 1.2, "sigma_min": 0.002, "sigma_max": 80.0,
                "entropy": {"enabled": True, "warmup_steps": 100, "transition_steps": 100, "gamma_max": 1.0}}
    in_bin = lambda s: ((s >= lo * 0.999) & (s <= hi * 1.001)).double().mean().item()  # noqa: E731
    assert in_bin(sch.draw_training_sigma(4000, 50, training, t, gen(0))) < 0.01
    assert in_bin(sch.draw_training_sigma(4000, 150, training, t, gen(0))) == pytest.approx(0.5, abs=0.04)
    assert in_bin(sch.draw_training_sigma(4000, 500, training, t, gen(0))) == 1.0
    assert in_bin(sch.draw_training_sigma(4000, 500, training, None, gen(0))) < 0.01
    floored = {**training, "entropy": {**training["entropy"], "floor": 0.2}}   # dead-bin guard from the config
    assert in_bin(sch.draw_training_sigma(4000, 500, floored, t, gen(0))) == pytest.approx(0.8 + 0.2 / 32, abs=0.03)
    off = {**training, "entropy": {**training["entropy"], "enabled": False}}
    assert in_bin(sch.draw_training_sigma(4000, 500, off, t, gen(0))) < 0.01


# ---- §5.4 / §5.5 grid and quantiles on synthetic tables -------------------------------------------

def test_sigma_grid_properties_and_fallback():
    t = sch.rebuild_entropy_tables(*synthetic_buffer(), num_bins=32)
    for n in (2, 16, 255):
        grid = t.sigma_grid(n)
        assert grid.shape == (n,) and grid.dtype == torch.float64
        assert (grid[1:] < grid[:-1]).all()
        assert grid[0].item() == pytest.approx(float(t.sigmas[-1])) and grid[-1].item() == 0.08
    # interior points invert the piecewise-linear CDF at equally spaced u (spec §5.4)
    grid = t.sigma_grid(33).flip(0)
    F = sch._interp(grid, t.sigmas.double(), t.cdf.double())
    torch.testing.assert_close(F[1:-1].diff(), F[1:-1].diff().mean().expand(30), rtol=1e-6, atol=1e-9)
    # all mass below the terminal σ -> F_hi − F_lo = 0 -> log-uniform fallback
    low = sch.rebuild_entropy_tables(torch.full((50,), 0.01), torch.full((50,), 1e-4), num_bins=32)
    fb = low.sigma_grid(5)
    torch.testing.assert_close(fb.log().diff(), fb.log().diff().mean().expand(4))
    with pytest.raises(ValueError, match="num_points"):
        t.sigma_grid(1)


def test_sigma_at_quantile_definition():
    t = sch.EntropySchedule(pdf=torch.tensor([0.0, 0.5, 0.25, 0.25]), cdf=torch.tensor([0.0, 0.5, 0.75, 1.0]),
                            sigmas=torch.tensor([1.0, 2.0, 3.0, 4.0]), edges=torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5]))
    assert t.sigma_at_quantile(0.0) == 1.0                        # i = 0 -> sig[0]
    assert t.sigma_at_quantile(0.25) == pytest.approx(1.5)        # between (0, 1) and (0.5, 2)
    assert t.sigma_at_quantile(0.6) == pytest.approx(2.4)
    assert t.sigma_at_quantile(1.0) == pytest.approx(4.0)
    q = t.sigma_at_quantile(torch.tensor([[0.25, 0.6]]))
    assert q.shape == (1, 2)
    torch.testing.assert_close(q, torch.tensor([[1.5, 2.4]], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        sch.EntropySchedule(pdf=torch.ones(3), cdf=torch.ones(3), sigmas=torch.ones(3), edges=torch.ones(3))


def test_karras_grid():
    g = sch.karras_grid(11, 0.08, 80.0, 7.0)
    assert g.shape == (11,) and g[0].item() == 80.0 and g[-1].item() == 0.08
    assert (g[1:] < g[:-1]).all()
    mid = (80.0 ** (1 / 7) + 0.5 * (0.08 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert g[5].item() == pytest.approx(mid)


# ---- the paper's released tables (spec §5.3-§5.5, §8.3) -------------------------------------------

@needs_reference
@pytest.mark.parametrize("profile,first,argmax,mass,quantiles,top", [
    ("lm1b", 50, 69, 0.0391, (0.33, 0.88, 4.23, 28.4), 76.756),
    ("owt", 49, 67, 0.0413, (0.33, 0.81, 4.23, 28.4), 70.658),
    ("owt_medium", 50, 68, 0.0425, (0.35, 0.88, 4.23, 28.4), 76.756),   # zero bin 126, not the top one
])
def test_released_tables_reproduce_spec_5_3(profile, first, argmax, mass, quantiles, top):
    t = sch.EntropySchedule.from_dir(REFERENCE / profile)
    assert [tuple(getattr(t, k).shape) for k in sch.TABLE_NAMES] == [(128,), (128,), (128,), (129,)]
    assert t.pdf.sum().item() == pytest.approx(1.0, abs=1e-6) and t.cdf[-1].item() == 1.0
    assert t.edges[0].item() == pytest.approx(0.002) and t.edges[-1].item() == pytest.approx(80.0)
    assert t.sigmas[-1].item() == pytest.approx(76.756, abs=1e-3)
    assert int((t.pdf > 0).nonzero()[0]) == first and (t.pdf[:first] == 0).all()
    assert int(t.pdf.argmax()) == argmax and t.pdf.max().item() == pytest.approx(mass, abs=5e-5)
    for q, expected in zip((0.10, 0.50, 0.90, 0.99), quantiles):
        i = int(torch.searchsorted(t.cdf, torch.tensor(q)))        # midpoint of the bin where the CDF reaches q
        assert t.sigmas[i].item() == pytest.approx(expected, rel=0.02)
        s = t.sigma_at_quantile(q)                                 # §5.5 interpolates inside that segment
        assert float(t.sigmas[i - 1]) <= s <= float(t.sigmas[i])
    # §8.3 "full band" window: σ(q=1) is 76.756 for LM1B and 70.658 for OWT (zero top bin)
    assert t.sigma_at_quantile(1.0) == pytest.approx(top, abs=1e-3)
    assert t.sigma_at_quantile(0.0) == pytest.approx(float(t.sigmas[0]))


@needs_reference
def test_released_lm1b_sigma_grid():
    t = sch.EntropySchedule.from_dir(REFERENCE / "lm1b")
    for n in (16, 255, 256):
        grid = t.sigma_grid(n, sigma_min=0.08, sigma_max=80.0)
        assert grid.shape == (n,) and (grid[1:] < grid[:-1]).all()
        assert grid[0].item() == pytest.approx(76.756, abs=1e-3) and grid[-1].item() == 0.08
    grid = t.sigma_grid(255)
    # spec §14.6: a single large last step, the penultimate point sits at the first non-empty bin (σ ≈ 0.13)
    assert 0.12 < grid[-2].item() < 0.2
    # independent reference for the interior points: numpy.interp(u, cdf, sig) with u equally spaced
    # between F(0.08) = 0 and F(76.756) = 1 (the CDF is paired with the bin midpoints, §5.4 quirk)
    np = pytest.importorskip("numpy")
    u = np.arange(255) / 254
    ref = np.interp(u, t.cdf.double().numpy(), t.sigmas.double().numpy())
    np.testing.assert_allclose(grid.flip(0).numpy()[1:-1], ref[1:-1], rtol=1e-9)
    # hence the grid points below the midpoint of the median bin (σ = 0.878) are those with u < cdf[73]
    assert (grid < t.sigmas[73].double()).sum().item() == int((u < float(t.cdf[73])).sum())


def test_rebuild_drops_non_finite_pairs_with_a_warning():
    """Spec §5.2: non-finite (σ, mse) pairs are dropped; one NaN used to make the table uniform."""
    g = torch.Generator().manual_seed(0)
    sigma = torch.exp(torch.randn(4000, generator=g) * 1.5)
    mse = sigma**2 / (sigma**2 + 0.25) * torch.rand(4000, generator=g)
    clean = sch.rebuild_entropy_tables(sigma, mse, num_bins=16)
    assert clean.pdf.std() > 0.01  # far from uniform: the check below is meaningful
    bad_sigma = torch.cat([sigma, torch.tensor([1.0, float("inf"), float("nan"), 2.0])])
    bad_mse = torch.cat([mse, torch.tensor([float("nan"), 0.1, 0.1, float("-inf")])])
    with pytest.warns(RuntimeWarning, match="dropped 4 of 4004"):
        rebuilt = sch.rebuild_entropy_tables(bad_sigma, bad_mse, num_bins=16)
    for name in ("pdf", "cdf", "sigmas", "edges"):
        torch.testing.assert_close(getattr(rebuilt, name), getattr(clean, name), rtol=0, atol=0)
