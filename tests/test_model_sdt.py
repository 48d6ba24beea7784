"""The SDT (spec §6-§7): zero init = matched filter, SC convention, shapes/dtypes, names and paper sizes."""

from __future__ import annotations

import pytest
import torch

from bitstream import diffusion as dif
from bitstream import model as mdl

torch.set_num_threads(1)


def tiny(**overrides) -> mdl.SDTConfig:
    cfg = dict(embed_dim=32, n_blocks=2, n_heads=2, dim_ff=64, content_dim=8, head_hidden=16, dropout=0.0,
               patch_size=5, seq_len=6)
    return mdl.SDTConfig(**{**cfg, **overrides})


def noisy_batch(cfg: mdl.SDTConfig, seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    S = cfg.seq_len * cfg.patch_size
    x0 = torch.randint(0, 2, (batch, S), generator=g).float()
    sigma = torch.tensor([0.01, 0.08, 1.0, 60.0])[:batch]
    return x0, sigma, x0 + sigma[:, None] * torch.randn(batch, S, generator=g)


def perturbed(cfg: mdl.SDTConfig, seed: int = 0) -> mdl.SDT:
    """An SDT whose zero-initialised gates are randomised, so it computes a non-trivial function."""
    torch.manual_seed(seed)
    net = mdl.SDT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("self_condition", [True, False])
def test_untrained_sdt_is_the_clipped_matched_filter(self_condition):
    cfg = tiny(self_condition=self_condition, dropout=0.1)
    net = mdl.SDT(cfg).train()                 # even with dropout active
    x0, sigma, x = noisy_batch(cfg)
    for x0_hat in (None, torch.rand_like(x), torch.zeros_like(x)):
        r = net(x, sigma, x0_hat)
        assert r.shape == x.shape and torch.equal(r, torch.zeros_like(r))
        logits = dif.denoise_logits(net, x, sigma, x0_hat, mode="matched_filter_residual", clip=30.0)
        assert torch.equal(logits, dif.matched_filter_logit(x, sigma, clip=30.0))
    assert (dif.matched_filter_logit(x, sigma).abs() == 30).any()     # the clip is exercised (σ = 0.01)


def test_self_conditioning_none_is_probability_one_half():
    cfg = tiny()
    net = perturbed(cfg)
    _, sigma, x = noisy_batch(cfg)
    with torch.no_grad():
        r_none = net(x, sigma, None)
        r_half = net(x, sigma, torch.full_like(x, 0.5))
        r_zero = net(x, sigma, torch.zeros_like(x))
    assert r_none.abs().max() > 1e-3
    assert torch.equal(r_none, r_half)        # contract: absent == all bits at 0.5 (s = 0)
    assert not torch.allclose(r_none, r_zero)


def test_without_self_conditioning_x0_hat_is_ignored():
    cfg = tiny(self_condition=False)
    net = perturbed(cfg)
    _, sigma, x = noisy_batch(cfg)
    with torch.no_grad():
        assert torch.equal(net(x, sigma, None), net(x, sigma, torch.rand_like(x)))


def test_rows_are_independent_and_sigma_matters():
    cfg = tiny()
    net = perturbed(cfg)
    _, sigma, x = noisy_batch(cfg)
    x0_hat = torch.rand_like(x)
    with torch.no_grad():
        full = net(x, sigma, x0_hat)
        rows = torch.cat([net(x[i:i + 1], sigma[i:i + 1], x0_hat[i:i + 1]) for i in range(len(x))])
        other_sigma = net(x, sigma * 2, x0_hat)
    torch.testing.assert_close(full, rows, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full, other_sigma)
    # a scalar σ is broadcast over the batch
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor(1.0), x0_hat), net(x, torch.ones(len(x)), x0_hat))


def test_token_position_enters_only_through_rope():
    """Without the RoPE rotation the SDT is equivariant to permuting tokens (the positional features are
    the same in every patch, spec §14.16); with it, token order matters."""
    cfg = tiny()
    net = perturbed(cfg)
    with torch.no_grad():                     # sharpen attention so that positions visibly matter
        for block in net.blocks:
            block.attn.qkv_proj.weight.mul_(20)
    _, sigma, x = noisy_batch(cfg)
    P, L = cfg.patch_size, cfg.seq_len
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(0))
    bit_perm = (perm[:, None] * P + torch.arange(P)).flatten()
    with torch.no_grad():
        moved = (net(x[:, bit_perm], sigma) - net(x, sigma)[:, bit_perm]).abs().max()
        assert moved > 1e-4, moved
        net.rope.inv_freq.zero_()             # angle 0: cos = 1, sin = 0 -> no rotation
        torch.testing.assert_close(net(x[:, bit_perm], sigma), net(x, sigma)[:, bit_perm], rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    rope = mdl.RotaryEmbedding(8, 10000.0)
    cos, sin = rope(12, torch.device("cpu"))
    q, k = torch.randn(8), torch.randn(8)
    rot = lambda v, i: mdl.apply_rope(v.expand(1, 1, 12, 8), cos, sin)[0, 0, i]  # noqa: E731
    score = lambda i, j: (rot(q, i) * rot(k, j)).sum()  # noqa: E731
    torch.testing.assert_close(score(3, 1), score(10, 8))
    torch.testing.assert_close(score(0, 0), (q * k).sum())
    assert not torch.allclose(score(3, 1), score(1, 3))


def test_bf16_autocast_forward_and_backward_on_cpu():
    cfg = tiny()
    net = perturbed(cfg).train()
    x0, sigma, x = noisy_batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = dif.denoise_logits(net, x, sigma, torch.rand_like(x))
    assert logits.dtype == torch.float32 and logits.shape == x.shape and torch.isfinite(logits).all()
    loss = dif.binary_sm_loss(logits, x0, sigma)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_zero_init_model_gets_a_gradient_through_the_head_gate():
    cfg = tiny()
    net = mdl.SDT(cfg)
    x0, sigma, x = noisy_batch(cfg)
    dif.binary_sm_loss(dif.denoise_logits(net, x, sigma, None), x0, sigma).backward()
    assert net.head.adaln.mlp[1].weight.grad.abs().sum() > 0


def test_input_validation():
    cfg = tiny()
    net = mdl.SDT(cfg)
    with pytest.raises(ValueError, match="bits"):
        net(torch.zeros(2, 7), torch.ones(2))
    with pytest.raises(ValueError, match="even head dimension"):
        tiny(embed_dim=30, n_heads=2)
    with pytest.raises(ValueError, match="unknown key"):
        mdl.SDTConfig.from_params({"embed_dims": 8}, bits=4, seq_len=4)
    cfg2 = mdl.SDTConfig.from_params({"embed_dim": 32, "n_heads": 2, "attention": "flash"}, bits=11, seq_len=32)
    assert (cfg2.patch_size, cfg2.seq_len, cfg2.sigma_data, cfg2.n_blocks) == (11, 32, 0.5, 12)


def test_flash_setting_falls_back_to_sdpa_on_cpu():
    _, sigma, x = noisy_batch(tiny())
    a, b = perturbed(tiny(attention="flash")), perturbed(tiny(attention="sdpa"))
    with torch.no_grad():
        assert torch.equal(a(x, sigma), b(x, sigma))


def test_state_dict_round_trip_is_strict():
    cfg = tiny()
    a, b = perturbed(cfg, seed=1), mdl.SDT(cfg)
    b.load_state_dict(a.state_dict(), strict=True)
    _, sigma, x = noisy_batch(cfg)
    with torch.no_grad():
        assert torch.equal(a(x, sigma), b.eval()(x, sigma))


# ---- paper sizes and upstream names (spec §6.1, Appendix B), on the meta device --------------------

@pytest.mark.parametrize("name", list(mdl.PAPER_SIZES))
def test_paper_parameter_counts(name):
    cfg, paper = mdl.PAPER_SIZES[name]
    assert mdl.count_params(cfg) == paper


def test_upstream_state_dict_names_and_shapes():
    with torch.device("meta"):
        net = mdl.SDT(mdl.SDTConfig(patch_size=15, seq_len=128))
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    E, C, P, H = 768, 64, 15, 128
    expected = {
        "cont_input_proj.weight": (C, 1), "cont_input_proj.bias": (C,), "time_proj.weight": (E, E),
        "time_cond.weight": (E, E), "time_cond.bias": (E,), "patch_proj.weight": (E, P * (2 * C + 73)),
        "blocks.11.attn.qkv_proj.weight": (3 * E, E), "blocks.11.attn.out_proj.weight": (E, E),
        "blocks.0.ff.Wa.weight": (2048, E), "blocks.0.ff.Wb.weight": (2048, E), "blocks.0.ff.Wo.weight": (E, 2048),
        "blocks.0.adaln1.mlp.1.weight": (3 * E, E), "blocks.0.adaln2.mlp.1.bias": (3 * E,),
        "unpatch_proj_content.weight": (P * C, E), "head.patch_adapter.weight": (P * H, E),
        "head.input_adapter.weight": (H, 3 * C), "head.time_proj.weight": (H, E),
        "head.adaln.mlp.1.weight": (3 * H, H), "head.mixer.0.weight": (H, H), "head.mixer.3.weight": (1, H),
        "time_fn._freq": (1, E),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert not any("inv_freq" in k or "pos_features" in k for k in shapes)   # non-persistent buffers
    assert "blocks.12.attn.qkv_proj.weight" not in shapes


def test_noise_embedding_and_position_features():
    emb = mdl.SinusoidalNoiseEmbedding(8)
    c = torch.tensor([0.0, 1.5])
    phi = emb(c)
    omega = 10000.0 ** (-2 * torch.arange(4) / 8)
    torch.testing.assert_close(phi[:, 0::2], torch.cos(c[:, None] * omega))
    torch.testing.assert_close(phi[:, 1::2], torch.sin(c[:, None] * omega))
    feats = mdl.bit_position_features(30, 15, 32, 4)
    assert feats.shape == (30, 73)
    assert (feats[:, :64] == 0).all() and torch.equal(feats[:15], feats[15:])
    torch.testing.assert_close(feats[:15, -1], ((torch.arange(15) - 7).abs() / 7).float())
    torch.testing.assert_close(feats[:15, 64], torch.sin(2 * torch.pi * torch.arange(15) / 14).float(), atol=1e-6, rtol=0)


def test_cli_prints_paper_sizes(capsys):
    mdl.main(["--sizes"])
    out = capsys.readouterr().out
    assert out.count(" ok") == 3 and "133,453,377" in out and "462,100,449" in out
