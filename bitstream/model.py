"""The SDT: a bit-patched adaLN-zero transformer that denoises continuous bitstreams (spec §6, §7).

One file, read top to bottom (nanoGPT style):

    per-bit scalars a = (x_σ − ½)·c_in, s = (x̂0 − ½)·c_in      §6.2 step 1, §7
    shared Linear(1 → C) embedding of a and s, + 73 positional features   steps 2-3
    bit-patching: P bits of one token → one position, Linear(P·D → E)     step 4
    noise embedding of ln σ: sinusoid + two linears                       step 5
    n_blocks × (adaLN-zero pre-norm attention with RoPE, SwiGLU)          step 6
    unpatch Linear(E → P·C), per-bit "optimal_skip_mlp" head → r          steps 7-8

``SDT.forward(x_sigma [B,S], sigma [B], x0_hat [B,S] or None) -> r [B,S]`` returns the raw residual
logit; the matched filter is added outside by ``bitstream.diffusion.denoise_logits`` (§3). Every gate
is zero-initialised, so an untrained SDT returns exactly 0 and the denoiser is the analytic matched
filter (§3).

Self-conditioning convention (project contract; spec §7, §14.9): ``x0_hat = None`` means "absent" and is
the same as all bits at probability 0.5, i.e. ``s = (0.5 − 0.5)·c_in = 0``. Upstream trained "absent"
rows with x̂0 = 0 (probability 0, ``s = −0.5·c_in``) but produced the SC estimate with None; we use
the one convention everywhere (training fills non-SC rows with 0.5, samplers and the VLB start with
None). Released upstream weights load by name, but were trained with the other convention: an imported
model's config carries ``sc_absent = 0.0`` (``bitstream.import_model``), so None means zeros for it.

Parameter names follow upstream (spec Appendix B) so released EMA checkpoints load strictly.
The token-space baseline (spec §6.3, §10.2, the official "onehot_tokens_ce" ablation) lives at the end:
:class:`TokenSDT` is the same trunk fed with one-hot token vectors through ``Linear(V → E)`` and read out
by a full softmax head ``Linear(E → V)`` (:class:`TokenHead`); ``architecture.representation: tokens``
selects it (:func:`build_model`). It exists to measure the O(V) vocabulary bottleneck the bit model
removes (spec §11; ``python -m bitstream.efficiency``): its logits are [B, L, V] where the SDT's are
[B, L·⌈log2 V⌉].

``python -m bitstream.model --sizes`` prints the paper sizes (built on the meta device, instant).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from bitstream.diffusion import LOGIT_MODES, SIGMA_DATA, c_in, c_noise, denoise_logits
from bitstream.io import stage_main

REPRESENTATIONS = ("bits", "tokens")

try:  # optional extra (pyproject [gpu]); used only for `attention: flash` on CUDA in half precision
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - missing or broken install: fall back to SDPA
    flash_attn_func = None


@dataclass
class SDTConfig:
    """Architecture (schema ``architecture`` section) + the run's shape. Defaults = CoBit-S (spec §6.1)."""

    embed_dim: int = 768          # E
    n_blocks: int = 12
    n_heads: int = 12             # head_dim = E / n_heads (even, for RoPE)
    dim_ff: int = 3072            # SwiGLU hidden = ⌊2·dim_ff/3⌋
    content_dim: int = 64         # C: per-bit embedding width
    head_hidden: int = 128        # H_h: per-bit head width
    dropout: float = 0.1
    rope_base: float = 10000.0
    self_condition: bool = True
    logit_mode: str = "matched_filter_residual"   # used by the denoiser wrapper (§3), not by forward
    mf_clip: float = 30.0
    attention: str = "sdpa"       # sdpa | flash (flash-attn if importable, on CUDA, half precision)
    patch_size: int = 15          # P = bits per token (run `bits`)
    seq_len: int = 128            # L tokens per sequence
    sigma_data: float = SIGMA_DATA    # fixed at 0.5 (spec §14.1)
    n_fourier_local: int = 4
    n_fourier_global: int = 32    # "local_only" mode: these 2·32 channels are zeros (spec §6.2 step 3)
    # Self-conditioning "no estimate yet" (x0_hat = None) as a bit probability: 0.5 for our own models,
    # 0.0 for imported upstream weights, which were trained and sampled with zeros (spec §7, §14.9).
    # Recorded in the checkpoint's architecture, so every consumer (samplers, VLB) uses the convention
    # the weights were trained with without knowing about it.
    sc_absent: float = 0.5
    representation: str = "bits"  # bits (SDT) | tokens (TokenSDT: one-hot token baseline, spec §6.3)
    vocab_size: int | None = None  # V of the tokens representation; None = 2**patch_size (every id fits)

    def __post_init__(self):
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"architecture.representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"architecture.vocab_size must be >= 2, got {self.vocab_size}")
        if self.representation == "tokens" and self.logit_mode != "none":
            # the matched filter is a per-bit posterior (§3); a softmax over V has no such closed form here
            raise ValueError(f"architecture: representation 'tokens' needs logit_mode 'none' (the matched filter "
                             f"is a per-bit posterior, spec §3), got {self.logit_mode!r}")
        if self.embed_dim % self.n_heads or (self.embed_dim // self.n_heads) % 2:
            raise ValueError(f"architecture: embed_dim ({self.embed_dim}) must be n_heads ({self.n_heads}) times "
                             f"an even head dimension (RoPE rotates pairs)")
        if self.embed_dim % 2:
            raise ValueError(f"architecture: embed_dim must be even (sinusoidal noise embedding), got {self.embed_dim}")
        if self.logit_mode not in LOGIT_MODES:
            raise ValueError(f"architecture.logit_mode must be one of {LOGIT_MODES}, got {self.logit_mode!r}")
        if self.attention not in ("sdpa", "flash"):
            raise ValueError(f"architecture.attention must be 'sdpa' or 'flash', got {self.attention!r}")

    @classmethod
    def from_params(cls, architecture: dict, bits: int, seq_len: int, sigma_data: float = SIGMA_DATA) -> "SDTConfig":
        """From the schema's ``architecture`` section plus the run's ``bits`` and ``seq_len``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(architecture) - known)
        if unknown:
            raise ValueError(f"architecture: unknown key(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**{**architecture, "patch_size": int(bits), "seq_len": int(seq_len), "sigma_data": float(sigma_data)})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def vocab(self) -> int:
        """V: the token model's vocabulary (``vocab_size``, else 2**P)."""
        return int(self.vocab_size) if self.vocab_size is not None else 2 ** self.patch_size

    @property
    def n_pos_features(self) -> int:
        return 2 * self.n_fourier_global + 2 * self.n_fourier_local + 1     # 73 in the paper

    @property
    def bit_features(self) -> int:
        """D: per-bit feature width = content (2C with SC, else C) + positional features (201 in the paper)."""
        return (2 if self.self_condition else 1) * self.content_dim + self.n_pos_features

    @property
    def ff_hidden(self) -> int:
        return (2 * self.dim_ff) // 3


# --------------------------------------------------------------------------------------------------
# Inputs: per-bit positional features (§6.2 step 3) and the noise embedding (§6.2 step 5)
# --------------------------------------------------------------------------------------------------

def bit_position_features(num_bits: int, patch_size: int, n_fourier_global: int, n_fourier_local: int) -> torch.Tensor:
    """[num_bits, 2·n_global + 2·n_local + 1] per-bit positional features, "local_only" mode (§6.2 step 3).

    Global Fourier channels are all zero in local_only mode (the paper's setting). On the within-token
    bit index ``l = i mod P``: ``sin(2πk·l/(P−1))``, k=1..n_local, then the cosines, then
    ``|l − (P−1)/2| / ((P−1)/2)``. These are identical for every patch, so after patching they act as a
    constant; token position comes only from RoPE (spec §14.16).
    """
    span = max(patch_size - 1, 1)          # P = 1 would divide by zero; the features are then all 0/1
    l = (torch.arange(num_bits) % patch_size).double()
    k = torch.arange(1, n_fourier_local + 1, dtype=torch.float64)
    angle = 2 * math.pi * l[:, None] * k[None, :] / span
    half = span / 2
    return torch.cat([torch.zeros(num_bits, 2 * n_fourier_global, dtype=torch.float64),
                      angle.sin(), angle.cos(), ((l - half).abs() / half)[:, None]], dim=1).float()


class SinusoidalNoiseEmbedding(nn.Module):
    """φ(c_noise) ∈ R^E: ``φ[2k] = cos(ω_k·c)``, ``φ[2k+1] = sin(ω_k·c)``, ``ω_k = 10000^{−2k/E}`` (§6.2 step 5).

    ``_freq`` [1, E] holds ω per channel (each frequency twice), a persistent buffer as upstream (App. B).
    """

    def __init__(self, dim: int):
        super().__init__()
        omega = 10000.0 ** (-2.0 * torch.arange(dim // 2, dtype=torch.float32) / dim)
        self.register_buffer("_freq", omega.repeat_interleave(2)[None, :])

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        angle = c.float()[:, None] * self._freq                  # [B, E]
        even = torch.arange(angle.shape[1], device=angle.device) % 2 == 0
        return torch.where(even, angle.cos(), angle.sin())


# --------------------------------------------------------------------------------------------------
# Trunk: adaLN-zero pre-norm blocks with RoPE attention and SwiGLU (§6.2 step 6)
# --------------------------------------------------------------------------------------------------

class AdaLN(nn.Module):
    """``(α, β, g) = split3(Linear_zero(SiLU(t)))``; ``modulate(h) = (1 + α)·LN(h) + β`` (LN without affine)."""

    def __init__(self, cond_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 3 * dim))     # state-dict name adaln*.mlp.1

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (modulated LN(h), gate g); ``t`` is [B, cond_dim], ``h`` is [B, ..., dim]."""
        alpha, beta, gate = self.mlp(t).chunk(3, dim=-1)
        shape = (t.shape[0],) + (1,) * (h.ndim - 2) + (h.shape[-1],)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-5)
        return (1 + alpha.view(shape)) * h + beta.view(shape), gate.view(shape)


class RotaryEmbedding(nn.Module):
    """RoPE over token positions, rotate-half convention, ``inv_freq_j = base^{−2j/d}``, cos/sin in fp32."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> cos, sin of shape [n, head_dim], float32."""
        pos = torch.arange(n, device=device, dtype=torch.float32)
        angle = pos[:, None] * self.inv_freq.to(device=device, dtype=torch.float32)[None, :]
        angle = torch.cat([angle, angle], dim=-1)
        return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, n, d] by the position angles (rotate-half: pairs are (j, j + d/2)); fp32 math."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Bidirectional multi-head self-attention: fused qkv, RoPE on q and k, SDPA (or flash-attn)."""

    def __init__(self, cfg: SDTConfig):
        super().__init__()
        self.n_heads, self.dropout, self.use_flash = cfg.n_heads, cfg.dropout, cfg.attention == "flash"
        self.qkv_proj = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.out_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, n, E = h.shape
        q, k, v = self.qkv_proj(h).view(B, n, 3, self.n_heads, E // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)          # [B, H, n, d]
        p = self.dropout if self.training else 0.0
        if self.use_flash and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p, causal=False)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=False).transpose(1, 2)
        return self.out_proj(y.reshape(B, n, E))


class SwiGLU(nn.Module):
    """``W_o · Dropout((W_a h) ⊙ SiLU(W_b h))`` with hidden width ⌊2·dim_ff/3⌋ (keeps the FLOPs of dim_ff)."""

    def __init__(self, cfg: SDTConfig):
        super().__init__()
        self.Wa = nn.Linear(cfg.embed_dim, cfg.ff_hidden)
        self.Wb = nn.Linear(cfg.embed_dim, cfg.ff_hidden)
        self.Wo = nn.Linear(cfg.ff_hidden, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.Wo(self.drop(self.Wa(h) * F.silu(self.Wb(h))))


class Block(nn.Module):
    """Pre-norm adaLN-zero block: ``x += Drop(Attn(mod1(x)))·g1; x += Drop(FF(mod2(x)))·g2`` (§6.2 step 6)."""

    def __init__(self, cfg: SDTConfig):
        super().__init__()
        self.adaln1 = AdaLN(cfg.embed_dim, cfg.embed_dim)
        self.attn = Attention(cfg)
        self.adaln2 = AdaLN(cfg.embed_dim, cfg.embed_dim)
        self.ff = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h, g1 = self.adaln1(x, t)
        x = x + self.drop(self.attn(h, cos, sin)) * g1
        h, g2 = self.adaln2(x, t)
        return x + self.drop(self.ff(h)) * g2


# --------------------------------------------------------------------------------------------------
# Per-bit output head, "optimal_skip_mlp" (§6.2 step 8)
# --------------------------------------------------------------------------------------------------

class BitHead(nn.Module):
    """One residual logit per bit from the token's trunk features, the bit's unpatched features and its
    own input embedding (a per-bit skip), modulated by σ with a zero-initialised gate (§6.2 step 8)."""

    def __init__(self, cfg: SDTConfig):
        super().__init__()
        H, C, P = cfg.head_hidden, cfg.content_dim, cfg.patch_size
        content = (2 if cfg.self_condition else 1) * C
        self.patch_adapter = nn.Linear(cfg.embed_dim, P * H)      # token features split per bit
        self.input_adapter = nn.Linear(C + content, H)            # [x_rec, content] of the bit
        self.time_proj = nn.Linear(cfg.embed_dim, H)
        self.adaln = AdaLN(H, H)
        self.mixer = nn.Sequential(nn.Linear(H, H), nn.SiLU(), nn.Dropout(cfg.dropout), nn.Linear(H, 1))

    def forward(self, tokens: torch.Tensor, x_rec: torch.Tensor, content: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, S = x_rec.shape[:2]
        h = self.patch_adapter(tokens).reshape(B, S, -1) + self.input_adapter(torch.cat([x_rec, content], dim=-1))
        u, gate = self.adaln(h, self.time_proj(t))
        return self.mixer(u * gate).squeeze(-1)                   # gate multiplies everything -> 0 at init


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------

class SDT(nn.Module):
    """Sequence denoising transformer over bits (spec §6). ``forward(x_sigma, sigma, x0_hat=None) -> r``."""

    def __init__(self, cfg: SDTConfig):
        super().__init__()
        if cfg.representation != "bits":
            raise ValueError(f"SDT needs architecture.representation 'bits', got {cfg.representation!r} (see build_model)")
        self.cfg = cfg
        E, C, P = cfg.embed_dim, cfg.content_dim, cfg.patch_size
        self.cont_input_proj = nn.Linear(1, C)                    # shared by noisy and SC scalars (§7)
        self.register_buffer("pos_features", bit_position_features(     # one token's bits: the same in every patch
            P, P, cfg.n_fourier_global, cfg.n_fourier_local), persistent=False)
        self.patch_proj = nn.Linear(P * cfg.bit_features, E)
        self.time_fn = SinusoidalNoiseEmbedding(E)
        self.time_proj = nn.Linear(E, E, bias=False)
        self.time_cond = nn.Linear(E, E)                          # no nonlinearity between the two (§6.2 step 5)
        self.rope = RotaryEmbedding(E // cfg.n_heads, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.unpatch_proj_content = nn.Linear(E, P * C)           # no final LayerNorm before it (§6.2 step 6)
        self.head = BitHead(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Spec §6.2: linears N(0, 0.02) with zero bias; adaLN modulations zero (identity blocks, r ≡ 0);
        the head's two input adapters Xavier-uniform."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, AdaLN):
                nn.init.zeros_(module.mlp[1].weight)
                nn.init.zeros_(module.mlp[1].bias)
        for adapter in (self.head.patch_adapter, self.head.input_adapter):
            nn.init.xavier_uniform_(adapter.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def logits(self, x_sigma: torch.Tensor, sigma: torch.Tensor, x0_hat: torch.Tensor | None = None) -> torch.Tensor:
        """Final bit logit ℓ (float32) with this config's ``logit_mode`` and ``mf_clip`` (spec §3); the
        signature samplers expect of a denoiser. (Under DDP call ``denoise_logits(ddp_model, ...)``.)"""
        return denoise_logits(self, x_sigma, sigma, x0_hat, mode=self.cfg.logit_mode, clip=self.cfg.mf_clip)

    def forward(self, x_sigma: torch.Tensor, sigma: torch.Tensor, x0_hat: torch.Tensor | None = None) -> torch.Tensor:
        """Raw residual logit ``r`` [B, S] for noisy bits ``x_sigma`` [B, S] at noise ``sigma`` [B] (§6.2).

        ``x0_hat`` [B, S]: self-conditioning bit probabilities, or None = absent = all bits at the
        config's ``sc_absent`` probability (0.5, i.e. s = 0, unless the weights were imported). It is
        ignored when the config has ``self_condition: false``.
        """
        cfg = self.cfg
        P = cfg.patch_size
        if x_sigma.ndim != 2 or x_sigma.shape[1] % P:
            raise ValueError(f"SDT: expected x_sigma of shape [B, L·{P}] (L tokens of {P} bits; the config "
                             f"has L = {cfg.seq_len}), got {tuple(x_sigma.shape)}")
        B, S = x_sigma.shape
        n = S // P
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x_sigma.device).expand(B)
        scale = c_in(sigma, cfg.sigma_data)[:, None]

        # 1-2. per-bit scalars and their shared embedding (§6.2, §7)
        a = (x_sigma.float() - 0.5) * scale
        content = self.cont_input_proj(a[..., None])
        if cfg.self_condition:
            s = ((cfg.sc_absent - 0.5) * scale).expand_as(a) if x0_hat is None else (x0_hat.float() - 0.5) * scale
            content = torch.cat([content, self.cont_input_proj(s[..., None])], dim=-1)

        # 3-4. positional features, bit-patching (bit-major inside a token)
        pos = self.pos_features.to(content.dtype).expand(B, n, P, -1)
        bits = torch.cat([content.view(B, n, P, -1), pos], dim=-1)         # [B, n, P, D]
        tokens = self.patch_proj(bits.reshape(B, n, P * cfg.bit_features))

        # 5. noise embedding of c_noise = ln σ
        t = self.time_cond(self.time_proj(self.time_fn(c_noise(sigma))))

        # 6. trunk
        cos, sin = self.rope(n, x_sigma.device)
        for block in self.blocks:
            tokens = block(tokens, t, cos, sin)

        # 7-8. unpatch and per-bit head
        x_rec = self.unpatch_proj_content(tokens).reshape(B, S, cfg.content_dim)
        return self.head(tokens, x_rec.to(content.dtype), content, t)


# --------------------------------------------------------------------------------------------------
# The token-space baseline: same trunk, one-hot token input, full softmax head (spec §6.3, §10.2)
# --------------------------------------------------------------------------------------------------

class TokenHead(nn.Module):
    """Full softmax head over V (upstream ``token_full``, spec §6.3):
    ``Linear(E → V)( SiLU(Linear(E → E)(LN(h))) + Linear(E → E)(t) )`` -> [B, L, V] token logits."""

    def __init__(self, embed_dim: int, vocab: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.time_proj = nn.Linear(embed_dim, embed_dim)
        self.out = nn.Linear(embed_dim, vocab)        # the O(V) output layer: d·V weights, B·L·V logits

    def forward(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.proj(self.norm(tokens))) + self.time_proj(t)[:, None, :]
        return self.out(h)


class TokenSDT(nn.Module):
    """Continuous one-hot token diffusion with the SDT trunk (spec §6.3, §10.2; the efficiency baseline).

    ``forward(x_sigma [B, L, V], sigma [B], x0_hat [B, L, V] or None) -> token logits [B, L, V]``.
    The clean state is the one-hot vector of each token, centred at 1/V (upstream's data centre for
    tokens): ``a = (x_σ − 1/V)·c_in`` enters through ``Linear(V → E)``; self-conditioning adds
    ``Linear(V → E)((x̂0 − 1/V)·c_in)``, where ``x̂0`` are softmax probabilities and None (absent) means
    the uniform distribution, i.e. a zero signal — the same "absent = uninformative" contract as the
    bit model (module docstring). Then the noise embedding and trunk of :class:`SDT` (no patching: one
    position per token) and :class:`TokenHead`. Trained with token cross-entropy
    (``bitstream.diffusion.token_ce_loss``); no matched filter (``logit_mode: none``).
    """

    def __init__(self, cfg: SDTConfig):
        super().__init__()
        if cfg.representation != "tokens":
            raise ValueError(f"TokenSDT needs architecture.representation 'tokens', got {cfg.representation!r}")
        self.cfg = cfg
        E, V = cfg.embed_dim, cfg.vocab
        self.input_proj = nn.Linear(V, E)
        self.sc_proj = nn.Linear(V, E) if cfg.self_condition else None
        self.time_fn = SinusoidalNoiseEmbedding(E)
        self.time_proj = nn.Linear(E, E, bias=False)
        self.time_cond = nn.Linear(E, E)
        self.rope = RotaryEmbedding(E // cfg.n_heads, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.head = TokenHead(E, V)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linears N(0, 0.02) with zero bias, adaLN modulations zero (as :meth:`SDT.reset_parameters`)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            if isinstance(module, AdaLN):
                nn.init.zeros_(module.mlp[1].weight)
                nn.init.zeros_(module.mlp[1].bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def logits(self, x_sigma: torch.Tensor, sigma: torch.Tensor, x0_hat: torch.Tensor | None = None) -> torch.Tensor:
        """Token logits (float32) [B, L, V]; ``softmax`` of them is the denoiser's estimate of x0."""
        return self(x_sigma, sigma, x0_hat).float()

    def forward(self, x_sigma: torch.Tensor, sigma: torch.Tensor, x0_hat: torch.Tensor | None = None) -> torch.Tensor:
        cfg, V = self.cfg, self.cfg.vocab
        if x_sigma.ndim != 3 or x_sigma.shape[2] != V:
            raise ValueError(f"TokenSDT: expected x_sigma of shape [B, L, V={V}] (noisy one-hot tokens), "
                             f"got {tuple(x_sigma.shape)}")
        B, n, _ = x_sigma.shape
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x_sigma.device).expand(B)
        scale = c_in(sigma, cfg.sigma_data)[:, None, None]
        dtype = self.input_proj.weight.dtype
        tokens = self.input_proj(((x_sigma.float() - 1.0 / V) * scale).to(dtype))
        if self.sc_proj is not None and x0_hat is not None:    # absent = uniform = a zero signal
            tokens = tokens + self.sc_proj(((x0_hat.float() - 1.0 / V) * scale).to(dtype))
        t = self.time_cond(self.time_proj(self.time_fn(c_noise(sigma))))
        cos, sin = self.rope(n, x_sigma.device)
        for block in self.blocks:
            tokens = block(tokens, t, cos, sin)
        return self.head(tokens, t)


def build_model(cfg: SDTConfig) -> nn.Module:
    """The network a config asks for: :class:`SDT` (``representation: bits``) or :class:`TokenSDT`."""
    return TokenSDT(cfg) if cfg.representation == "tokens" else SDT(cfg)


# --------------------------------------------------------------------------------------------------
# Parameter counts: python -m bitstream.model --sizes | --config config/config.yaml
# --------------------------------------------------------------------------------------------------

PAPER_SIZES = {   # spec §6.1: name -> (config, published parameter count)
    "CoBit-S LM1B (P=15, L=128)": (SDTConfig(patch_size=15, seq_len=128), 133_453_377),
    "CoBit-S OWT (P=16, L=1024)": (SDTConfig(patch_size=16, seq_len=1024), 133_755_393),
    "CoBit-M OWT (P=16, L=1024)": (SDTConfig(embed_dim=1024, n_blocks=24, n_heads=16, dim_ff=4096,
                                             patch_size=16, seq_len=1024), 462_100_449),
}


def count_params(cfg: SDTConfig) -> int:
    """Parameter count of the configured network, built on the meta device (no memory, instant)."""
    with torch.device("meta"):
        return build_model(cfg).num_params()


@stage_main("model")
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.model", description="SDT parameter counts (spec §6.1).")
    ap.add_argument("--sizes", action="store_true", help="the paper's three model sizes")
    ap.add_argument("--config", default=None, help="a workflow config YAML: counts of every (run, model) pair")
    args = ap.parse_args(argv)
    if not args.sizes and args.config is None:
        args.sizes = True
    if args.sizes:
        for name, (cfg, paper) in PAPER_SIZES.items():
            n = count_params(cfg)
            print(f"{name:30s} {n:>13,d}   paper {paper:>13,d}   {'ok' if n == paper else 'MISMATCH'}")
    if args.config is not None:
        import yaml
        from pathlib import Path

        path = Path(args.config)
        if not path.exists():
            raise SystemExit(f"{path}: config file not found")
        config = yaml.safe_load(path.read_text())
        try:
            for run_name, run in (config.get("runs") or {}).items():
                for model_name in run.get("models", []):
                    if model_name not in (config.get("models") or {}):
                        raise ValueError(f"{path}: run {run_name!r} lists model {model_name!r}, not under 'models'")
                    arch = (config["models"][model_name] or {}).get("architecture", {}) or {}
                    cfg = SDTConfig.from_params(arch, bits=run["bits"], seq_len=run["seq_len"])
                    print(f"{run_name + '/' + model_name:30s} P={cfg.patch_size:<3d} L={cfg.seq_len:<5d} "
                          f"{count_params(cfg):>13,d} parameters")
        except ValueError as err:
            raise SystemExit(str(err))


if __name__ == "__main__":
    main()
