"""Samplers (spec §8) against closed-form denoisers: update rule, churn gating, NFE, SC, randomness.

No trained model is involved: the matched filter ``(x − ½)/σ²`` is the exact posterior log-odds of
independent uniform bits (spec §3), and adding ``log(p/(1−p))`` makes it exact for Bernoulli(p) bits.
"""

from __future__ import annotations

import math

import pytest
import torch

from bitstream.samplers import (
    CallCounter, SampleNoise, ati_shift, calls_per_step, churn_gammas, grid_points_for_nfe,
    sample_ddim, sample_heun,
)

torch.set_num_threads(1)


def matched_filter(x, sigma, x0_hat=None):
    return ((x - 0.5) / sigma[:, None] ** 2).clamp(-30.0, 30.0)


def bernoulli_posterior(p):
    """Exact logit of E[b | x] for i.i.d. Bernoulli(p) bits under x = b + σε."""
    log_odds = math.log(p / (1 - p))
    return lambda x, sigma, x0_hat=None: matched_filter(x, sigma) + log_odds


def karras(n, lo=0.08, hi=80.0, rho=7.0):
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    s = (hi ** (1 / rho) + t * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    s[0], s[-1] = hi, lo
    return s


class Spy:
    """Records every call (x, σ label, x0_hat) and the logits it returned."""

    def __init__(self, inner=matched_filter):
        self.inner, self.calls = inner, []

    def __call__(self, x, sigma, x0_hat):
        out = self.inner(x, sigma, x0_hat)
        self.calls.append({"x": x.clone(), "sigma": sigma.clone(),
                           "x0_hat": None if x0_hat is None else x0_hat.clone(), "logits": out.clone()})
        return out


def latents(b=8, s=24, seed=0):
    return torch.randn(b, s, generator=torch.Generator().manual_seed(seed))


# ---- the update rule -------------------------------------------------------------------------------


def test_one_ddim_step_matches_the_closed_form():
    lat = latents()
    s0, s1 = 2.0, 0.5
    spy = Spy()
    out = sample_ddim(spy, lat, [s0, s1], sc_mode="none")
    x0 = 0.5 + s0 * lat
    D0 = torch.sigmoid((x0 - 0.5) / s0**2)                                # matched filter at (x0, σ0)
    x1 = x0 + (s1 - s0) * (x0 - D0) / s0                                  # Euler step of dx/dσ = (x − D)/σ
    assert len(spy.calls) == 2 == out.nfe
    torch.testing.assert_close(spy.calls[0]["x"], x0)
    assert torch.all(spy.calls[0]["sigma"] == s0) and torch.all(spy.calls[1]["sigma"] == s1)
    torch.testing.assert_close(spy.calls[1]["x"], x1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.x, x1, rtol=1e-6, atol=1e-6)
    probs = torch.sigmoid((x1 - 0.5) / s1**2)
    torch.testing.assert_close(out.probs, probs, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.bits, (out.probs > 0.5).to(torch.uint8))


def test_threshold_is_strict():
    zero = lambda x, sigma, h: torch.zeros_like(x)  # noqa: E731  probability exactly 0.5 everywhere
    out = sample_ddim(zero, latents(), [1.0, 0.1])
    assert torch.all(out.probs == 0.5) and out.bits.sum() == 0
    out = sample_ddim(lambda x, s, h: torch.full_like(x, 1e-3), latents(), [1.0, 0.1], threshold=0.5)
    assert torch.all(out.bits == 1)


def test_heun_step_matches_the_closed_form():
    lat = latents()
    s0, s1 = 3.0, 0.7
    out = sample_heun(matched_filter, lat, [s0, s1], sc_mode="none")
    x0 = 0.5 + s0 * lat
    d0 = (x0 - torch.sigmoid((x0 - 0.5) / s0**2)) / s0
    xp = x0 + (s1 - s0) * d0
    d1 = (xp - torch.sigmoid((xp - 0.5) / s1**2)) / s1
    torch.testing.assert_close(out.x, x0 + 0.5 * (s1 - s0) * (d0 + d1), rtol=1e-6, atol=1e-6)
    assert out.nfe == 3


# ---- churn --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [sample_ddim, sample_heun])
def test_gamma_zero_is_exactly_the_deterministic_sampler(sampler):
    lat, grid = latents(), karras(12)
    draws = []

    def randn_like(x):
        draws.append(1)
        return torch.randn_like(x)

    det = sampler(matched_filter, lat, grid)
    zero = sampler(matched_filter, lat, grid, gamma=0.0, window=(0.0, 1e9), s_noise=1.5, randn_like=randn_like)
    assert not draws, "γ = 0 must not draw noise"
    assert torch.equal(det.x, zero.x) and torch.equal(det.probs, zero.probs) and torch.equal(det.bits, zero.bits)
    noisy = sampler(matched_filter, lat, grid, gamma=0.2, window=(0.0, 1e9))
    assert not torch.equal(det.x, noisy.x)


def test_churn_only_inside_the_window():
    grid = karras(16)
    window = (0.5, 10.0)
    gamma, lat = 0.25, latents()
    spy = Spy()
    noise = SampleNoise(3, range(lat.shape[0]))
    out = sample_ddim(spy, lat, grid, gamma=gamma, window=window, sc_mode="none", randn_like=noise.randn_like)
    in_window = [window[0] <= float(s) <= window[1] for s in grid[:-1]]
    assert [g > 0 for g in out.gammas] == in_window and any(in_window) and not all(in_window)
    # Rebuild each step's pre-churn state from the previous call and check who was perturbed.
    x = 0.5 + float(grid[0]) * lat
    for i, call in enumerate(spy.calls[:-1]):
        sigma_hat = float(grid[i]) * (1 + (gamma if in_window[i] else 0.0))
        assert float(call["sigma"][0]) == pytest.approx(sigma_hat, rel=1e-6)
        altered = not torch.allclose(call["x"], x, rtol=1e-5, atol=1e-5)
        assert altered == in_window[i], f"step {i} (σ={float(grid[i]):.3g})"
        D = torch.sigmoid(call["logits"])
        x = call["x"] + (float(grid[i + 1]) - sigma_hat) * (call["x"] - D) / sigma_hat


def test_churn_noise_has_the_edm_magnitude():
    grid = [4.0, 1.0]
    lat = torch.zeros(1, 20000)
    eps = torch.randn(1, 20000, generator=torch.Generator().manual_seed(1))
    spy = Spy()
    sample_ddim(spy, lat, grid, gamma=0.3, window=(0, 10), s_noise=1.003, randn_like=lambda x: eps, sc_mode="none")
    sigma_hat = 4.0 * 1.3
    expected = 0.5 + math.sqrt(sigma_hat**2 - 16.0) * 1.003 * eps
    torch.testing.assert_close(spy.calls[0]["x"], expected)


def test_churn_gammas_cap_and_inclusive_window():
    assert churn_gammas([80.0, 10.0, 1.0, 0.08], 0.2, (1.0, 80.0)) == [0.2, 0.2, 0.2]
    assert churn_gammas([80.0, 10.0, 1.0, 0.08], 0.2, (1.0 + 1e-3, 79.0)) == [0.0, 0.2, 0.0]
    with pytest.raises(ValueError, match="gamma"):
        churn_gammas([2.0, 1.0], 0.5, (0, 9))


# ---- NFE accounting -------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,method", [(sample_ddim, "ddim"), (sample_heun, "heun")])
@pytest.mark.parametrize("sc_mode", ["carry", "refined", "none"])
@pytest.mark.parametrize("gamma", [0.0, 0.2])
def test_reported_nfe_equals_network_calls(sampler, method, sc_mode, gamma):
    for nfe in (7, 13):
        c = calls_per_step(method, sc_mode)
        if (nfe - 1) % c:
            continue
        n = grid_points_for_nfe(nfe, method, sc_mode)
        counter = CallCounter(matched_filter)
        out = sampler(counter, latents(2, 8), karras(n), gamma=gamma, window=(0, 100), sc_mode=sc_mode)
        assert counter.calls == out.nfe == nfe == c * (n - 1) + 1


def test_nfe_is_honest_and_unreachable_values_are_errors():
    assert grid_points_for_nfe(256, "ddim", "carry") == 256  # 256-point grid, 256 calls (upstream: 255)
    assert grid_points_for_nfe(255, "ddim", "refined") == 128
    assert grid_points_for_nfe(63, "heun", "none") == 32
    with pytest.raises(ValueError, match="nfe 64 is not reachable.*use nfe 63 or 65"):
        grid_points_for_nfe(64, "heun", "carry")
    with pytest.raises(ValueError, match="not reachable"):
        grid_points_for_nfe(2, "heun", "refined")


# ---- self-conditioning ----------------------------------------------------------------------------


def test_carry_feeds_each_steps_probabilities_into_the_next_call():
    spy = Spy(bernoulli_posterior(0.3))
    grid = karras(9)
    sample_ddim(spy, latents(), grid, gamma=0.1, window=(0, 100), sc_mode="carry")
    assert len(spy.calls) == 9
    assert spy.calls[0]["x0_hat"] is None                       # contract: start from None
    for prev, nxt in zip(spy.calls, spy.calls[1:]):             # ... including the final call
        torch.testing.assert_close(nxt["x0_hat"], torch.sigmoid(prev["logits"]), rtol=0, atol=0)


def test_refined_refreshes_at_the_new_state():
    spy = Spy()
    grid = karras(5)
    out = sample_ddim(spy, latents(), grid, sc_mode="refined")
    assert out.nfe == len(spy.calls) == 2 * 4 + 1
    assert spy.calls[0]["x0_hat"] is None
    for i in range(4):
        step, refresh = spy.calls[2 * i], spy.calls[2 * i + 1]
        torch.testing.assert_close(refresh["x0_hat"], torch.sigmoid(step["logits"]), rtol=0, atol=0)
        assert torch.all(refresh["sigma"] == torch.tensor(float(grid[i + 1]), dtype=torch.float32))
        nxt = spy.calls[2 * i + 2]
        torch.testing.assert_close(nxt["x0_hat"], torch.sigmoid(refresh["logits"]), rtol=0, atol=0)
        torch.testing.assert_close(nxt["x"], refresh["x"], rtol=0, atol=0)  # deterministic: same state


@pytest.mark.parametrize("sampler", [sample_ddim, sample_heun])
def test_none_mode_never_self_conditions(sampler):
    spy = Spy()
    sampler(spy, latents(), karras(4), gamma=0.2, window=(0, 100), sc_mode="none")
    assert all(c["x0_hat"] is None for c in spy.calls)


def test_heun_carries_the_first_evaluation():
    spy = Spy(bernoulli_posterior(0.4))
    sample_heun(spy, latents(), karras(4), sc_mode="carry")
    calls = spy.calls
    assert calls[0]["x0_hat"] is None
    for i in range(3):
        first, second = calls[2 * i], calls[2 * i + 1]
        torch.testing.assert_close(second["x0_hat"], torch.sigmoid(first["logits"]), rtol=0, atol=0)
        torch.testing.assert_close(calls[2 * i + 2]["x0_hat"], torch.sigmoid(first["logits"]), rtol=0, atol=0)


# ---- ATI ------------------------------------------------------------------------------------------


def test_ati_shifts_only_the_label():
    assert ati_shift(1.0, 4.0, 0.0) == 1.0 and ati_shift(1.0, None, 0.5) == 1.0 and ati_shift(4.0, 1.0, 0.5) == 4.0
    assert ati_shift(1.0, 4.0, 0.5) == pytest.approx(2.0)      # geometric midpoint
    assert ati_shift(1.0, 4.0, 1.0) == pytest.approx(4.0)
    grid = [4.0, 1.0, 0.25]
    spy = Spy()
    lat = latents()
    sample_ddim(spy, lat, grid, eta=0.5, sc_mode="none")
    labels = [float(c["sigma"][0]) for c in spy.calls]
    assert labels == pytest.approx([4.0, 2.0, 0.5])             # first step unshifted, final shifted
    # the state update still uses the true σ: x1 = x0 + (σ1 − σ0)(x0 − D(x0 | label σ0))/σ0
    x0 = 0.5 + 4.0 * lat
    D0 = torch.sigmoid(spy.calls[0]["logits"])
    torch.testing.assert_close(spy.calls[1]["x"], x0 + (1.0 - 4.0) * (x0 - D0) / 4.0)


# ---- the analytic posterior ----------------------------------------------------------------------


def test_matched_filter_flow_keeps_the_sign_of_the_noise():
    """Independent uniform bits: each DDIM step is a convex mix of x and D with D − ½ of the sign of
    x − ½, so the deterministic sampler returns exactly bit = [ε > 0] — unbiased coin flips."""
    lat = latents(64, 64, seed=5)
    out = sample_ddim(matched_filter, lat, karras(16))
    assert torch.equal(out.bits, (lat > 0).to(torch.uint8))


def test_stochastic_matched_filter_bits_are_fair_coins():
    n_bits = 64 * 64
    noise = SampleNoise(11, range(64))
    out = sample_ddim(matched_filter, noise.randn(64), karras(16), gamma=0.2, window=(0.08, 80),
                      randn_like=noise.randn_like)
    assert abs(out.bits.float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n_bits)


def test_exact_posterior_gives_the_prior_bit_rate():
    """With the exact denoiser of Bernoulli(p) bits the probability-flow ODE carries the Gaussian start
    to the data marginal: Heun's bit rate is p within binomial error; DDIM's first-order error shrinks."""
    p, lat = 0.2, latents(64, 256, seed=7)
    tol = 4 * math.sqrt(p * (1 - p) / lat.numel())
    heun = sample_heun(bernoulli_posterior(p), lat, karras(24), sc_mode="none")
    assert abs(heun.bits.float().mean().item() - p) < tol + 2e-3
    errs = [abs(sample_ddim(bernoulli_posterior(p), lat, karras(n), sc_mode="none").bits.float().mean().item() - p)
            for n in (8, 64)]
    assert errs[1] < errs[0] and errs[1] < 0.01


# ---- randomness -----------------------------------------------------------------------------------


def test_sample_noise_streams_belong_to_samples():
    a = SampleNoise(7, range(0, 16)).randn(40)
    b = torch.cat([SampleNoise(7, range(k, k + 4)).randn(40) for k in range(0, 16, 4)])
    assert torch.equal(a, b)
    assert torch.equal(SampleNoise(7, [3, 9]).randn(40), a[[3, 9]])
    assert not torch.equal(SampleNoise(8, range(16)).randn(40), a)
    assert len({tuple(r.tolist()) for r in a}) == 16            # no two samples share a stream
    with pytest.raises(ValueError, match="seed"):
        SampleNoise(-1, range(2))


def _noise_list(shape, n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("method, sc_mode", [("ddim", "refined"), ("heun", "carry"), ("heun", "refined")])
def test_ati_reference_after_churn_is_the_churned_sigma(method, sc_mode):
    """After churn the state sits at σ̂ = σ_i(1 + γ), so a call at σ_{i+1} (Heun's corrector, the refined
    SC call) takes σ̂ as its noisier ATI reference (issue 13: it took σ_i). Checked call by call and
    against a closed-form reference run (matched-filter denoiser, spec §3, §8.2-§8.6)."""
    grid, gamma, eta, s_noise = [float(v) for v in karras(6)], 0.3, 0.5, 1.003
    lat = latents(4, 12)
    noise = _noise_list(lat.shape, len(grid))
    spy = Spy()
    fn = sample_ddim if method == "ddim" else sample_heun
    it = iter(noise)
    out = fn(spy, lat, torch.tensor(grid, dtype=torch.float64), randn_like=lambda x: next(it), gamma=gamma,
             window=(0.0, 100.0), s_noise=s_noise, sc_mode=sc_mode, eta=eta)

    # closed-form reference, written out from the spec with σ̂ as the reference after churn
    D = lambda x, lab, _sc=None: torch.sigmoid(matched_filter(x, torch.full((x.shape[0],), lab)))  # noqa: E731
    x, labels = 0.5 + grid[0] * lat, []
    for i in range(len(grid) - 1):
        hat = grid[i] * (1 + gamma)
        x = x + math.sqrt(hat**2 - grid[i] ** 2) * s_noise * noise[i]
        lab = ati_shift(hat, grid[i - 1] if i else None, eta)
        d1 = D(x, lab)
        labels.append(lab)
        nxt = ati_shift(grid[i + 1], hat, eta)
        if method == "ddim":
            x = x + (grid[i + 1] - hat) * (x - d1) / hat
        else:
            pred = x + (grid[i + 1] - hat) * (x - d1) / hat
            d2 = D(pred, nxt)
            labels.append(nxt)
            x = x + 0.5 * (grid[i + 1] - hat) * ((x - d1) / hat + (pred - d2) / grid[i + 1])
        if sc_mode == "refined":
            labels.append(nxt)
    labels.append(ati_shift(grid[-1], grid[-2], eta))
    got = [float(c["sigma"][0]) for c in spy.calls]
    assert got == pytest.approx(labels, rel=1e-6)
    assert any(abs(ati_shift(grid[i + 1], grid[i], eta) - ati_shift(grid[i + 1], grid[i] * (1 + gamma), eta)) > 1e-3
               for i in range(len(grid) - 1))  # the two references really differ here
    torch.testing.assert_close(out.x, x, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.bits, (D(x, labels[-1]) > 0.5).to(torch.uint8))
