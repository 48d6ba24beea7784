"""VE process, matched filter, loss and base σ samplers (spec §2-§4): closed forms and distributions."""

from __future__ import annotations

import math

import pytest
import torch

from bitstream import diffusion as dif


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- §2 preconditioning ---------------------------------------------------------------------------

def test_preconditioning_and_forward_process():
    sigma = torch.tensor([0.002, 0.5, 80.0])
    torch.testing.assert_close(dif.c_in(sigma), 1 / torch.sqrt(sigma**2 + 0.25))
    torch.testing.assert_close(dif.c_noise(sigma), sigma.log())
    x0 = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    noise = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.5, 0.5]])
    torch.testing.assert_close(dif.add_noise(x0, sigma, noise), x0 + sigma[:, None] * noise)


# ---- §3 matched filter ----------------------------------------------------------------------------

def bayes_logit(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """log p(x|b=1) − log p(x|b=0) from the two Gaussian log-likelihoods, float64."""
    def log_normal(v, mean):
        return -0.5 * ((v - mean) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
    return log_normal(x, 1.0) - log_normal(x, 0.0)


@pytest.mark.parametrize("sigma", [0.03, 0.08, 0.2, 0.5, 1.0, 4.0, 80.0])
def test_matched_filter_is_the_exact_posterior_of_an_isolated_uniform_bit(sigma):
    g = gen(1)
    b = torch.randint(0, 2, (4096,), generator=g).double()
    x = b + sigma * torch.randn(4096, generator=g, dtype=torch.float64)
    exact = bayes_logit(x, sigma)
    # posterior P(b=1|x) with a uniform prior, directly from Bayes' rule (log-sum-exp for stability)
    log_p1 = -0.5 * ((x - 1) / sigma) ** 2
    log_p0 = -0.5 * (x / sigma) ** 2
    posterior = torch.exp(log_p1 - torch.logaddexp(log_p1, log_p0))

    mf = dif.matched_filter_logit(x.float(), sigma)
    assert mf.dtype == torch.float32
    # the filter equals the clipped exact log-odds (float32 rounding only)
    torch.testing.assert_close(mf.double(), exact.clamp(-30, 30), rtol=1e-5, atol=1e-4)
    inside = exact.abs() < 30
    torch.testing.assert_close(torch.sigmoid(mf.double())[inside], posterior[inside], rtol=1e-4, atol=1e-6)
    if sigma <= 0.08:                  # the clip region is exercised at low σ
        assert (~inside).any() and (mf[~inside].abs() == 30).all()


def test_matched_filter_broadcasts_per_example_sigma_and_honours_options():
    x = torch.tensor([[0.9, 0.1], [0.7, 0.2]], dtype=torch.bfloat16)
    sigma = torch.tensor([1.0, 0.5])
    out = dif.matched_filter_logit(x, sigma)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (x.float() - 0.5) / sigma[:, None] ** 2)
    torch.testing.assert_close(out, dif.matched_filter_logit(x, sigma[:, None]))
    torch.testing.assert_close(dif.matched_filter_logit(x, 0.01, clip=5.0).abs().max(), torch.tensor(5.0))
    torch.testing.assert_close(dif.matched_filter_logit(x, 1.0, center=0.0, scale=2.0), 2 * x.float())


def test_denoise_logits_modes():
    x = torch.randn(3, 6)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    calls = []

    def net(x_, s_, x0_hat):
        calls.append(x0_hat)
        return torch.full_like(x_, 0.25, dtype=torch.bfloat16)

    mf = dif.matched_filter_logit(x, sigma)
    out = dif.denoise_logits(net, x, sigma, None)
    assert out.dtype == torch.float32 and calls == [None]
    torch.testing.assert_close(out, mf + 0.25)
    torch.testing.assert_close(dif.denoise_logits(net, x, sigma, None, mode="none"), torch.full_like(x, 0.25))

    def forbidden(*args):
        raise AssertionError("matched_filter_only must not call the network")

    torch.testing.assert_close(dif.denoise_logits(forbidden, x, sigma, None, mode="matched_filter_only", clip=5.0),
                               dif.matched_filter_logit(x, sigma, clip=5.0))
    torch.testing.assert_close(dif.denoise_logits(net, x, sigma[:, None], None), out)   # [B, 1] accepted
    with pytest.raises(ValueError, match="one value per row"):
        dif.denoise_logits(net, x, sigma[:2], None)
    with pytest.raises(ValueError, match="logit_mode"):
        dif.denoise_logits(net, x, sigma, None, mode="inv_sigma2")


# ---- §4.1-§4.2 weighting and losses ---------------------------------------------------------------

def test_edm_weight_is_four_plus_inverse_sigma_squared():
    sigma = torch.tensor([0.002, 0.08, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(dif.edm_weight(sigma).double(), 4 + 1 / sigma**2, rtol=1e-6, atol=0)
    torch.testing.assert_close(dif.loss_weight(sigma, "unit"), torch.ones(6))
    # general σ_d: (σ² + σ_d²)/(σ² σ_d²) = 1/σ_d² + 1/σ²
    torch.testing.assert_close(dif.edm_weight(torch.tensor([2.0]), sigma_data=1.0), torch.tensor([1.25]))


def test_losses_closed_forms():
    x0 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    sigma = torch.tensor([0.5, 1.0])                 # λ = 8, 5
    zeros = torch.zeros(2, 3)
    # D = 1/2 everywhere: squared error 1/4, BCE ln 2
    assert dif.binary_sm_loss(zeros, x0, sigma).item() == pytest.approx(0.25 * (8 + 5) / 2)
    assert dif.binary_ce_loss(zeros, x0, sigma).item() == pytest.approx(math.log(2) * (8 + 5) / 2)
    assert dif.binary_sm_loss(zeros, x0, sigma, weighting="unit").item() == pytest.approx(0.25)
    # ℓ = ln 3 -> D = 3/4: error 1/16 on 1-bits, 9/16 on 0-bits; plain mean over B·S
    logits = torch.full((2, 3), math.log(3.0))
    err = torch.where(x0 == 1, 1 / 16, 9 / 16)
    expected = ((torch.tensor([8.0, 5.0])[:, None] * err).sum() / 6).item()
    assert dif.binary_sm_loss(logits, x0, sigma).item() == pytest.approx(expected, rel=1e-6)
    mse = dif.per_example_mse(torch.sigmoid(logits), x0)
    torch.testing.assert_close(mse, err.mean(dim=1))
    assert not mse.requires_grad
    assert set(dif.LOSSES) == {"binary_sm", "binary_ce"}


def test_loss_is_float32_under_half_precision_inputs_and_differentiable():
    logits = torch.randn(2, 4, dtype=torch.bfloat16, requires_grad=True)
    loss = dif.binary_sm_loss(logits, torch.ones(2, 4), torch.tensor([0.3, 3.0]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all()


# ---- §4.3 base σ samplers -------------------------------------------------------------------------

def truncated_normal_moments(mu, s, lo, hi):
    a, b = (lo - mu) / s, (hi - mu) / s
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    Z = Phi(b) - Phi(a)
    mean = mu + s * (phi(a) - phi(b)) / Z
    var = s * s * (1 + (a * phi(a) - b * phi(b)) / Z - ((phi(a) - phi(b)) / Z) ** 2)
    return mean, var


@pytest.mark.parametrize("lo,hi", [(0.002, 80.0), (0.1, 2.0), (math.exp(3.0), math.exp(4.0)),
                                   (math.exp(-7.0), math.exp(-6.0))])
def test_log_normal_sampler_is_the_truncated_log_normal(lo, hi):
    n = 100_000
    sigma = dif.sample_sigma_log_normal(n, -1.2, 1.2, lo, hi, gen(3))
    assert sigma.shape == (n,) and sigma.dtype == torch.float32
    assert sigma.min() >= lo * (1 - 1e-6) and sigma.max() <= hi * (1 + 1e-6)
    mean, var = truncated_normal_moments(-1.2, 1.2, math.log(lo), math.log(hi))
    ln = sigma.double().log()
    se = math.sqrt(var / n)
    assert abs(ln.mean().item() - mean) < 6 * se + 1e-6
    assert ln.var().item() == pytest.approx(var, rel=0.03)


def test_samplers_are_reproducible_from_the_generator():
    a = dif.sample_sigma_base(64, "log_normal", gen(7))
    b = dif.sample_sigma_base(64, "log_normal", gen(7))
    c = dif.sample_sigma_base(64, "log_normal", gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    u = dif.sample_sigma_base(50_000, "log_uniform", gen(0), sigma_min=0.01, sigma_max=100.0)
    assert u.min() >= 0.01 * (1 - 1e-6) and u.max() <= 100.0 * (1 + 1e-6)
    assert u.log().mean().item() == pytest.approx(math.log(1.0), abs=0.05)
    with pytest.raises(ValueError, match="sigma_sampler"):
        dif.sample_sigma_base(4, "karras", gen(0))
