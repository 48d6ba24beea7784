"""Efficiency of the bit representation: the paper's O(log V) vs O(V) claim, measured (spec §11).

The bit model predicts ⌈log2 V⌉ logits per token where a token-space model predicts V, so the output
side — logits, their loss, the output layer — stops growing with the vocabulary. Four measurements:

* **analytic** — token logits B·T·V vs bit logits B·T·⌈log2 V⌉, their bf16 sizes and the output-layer
  parameters for the five settings of spec §11 (OWT appears at both of its batch sizes, 128 and 512).
* **boundary** — output head + loss, forward and backward, on synthetic trunk activations [B, T, d]
  over a grid of (T, V, d): the token head (:class:`~bitstream.model.TokenHead` + token CE) against the
  bit head (unpatch ``Linear(d → P·C)`` + :class:`~bitstream.model.BitHead` + per-bit BCE, P = ⌈log2 V⌉,
  C = 64 (no self-conditioning), H_h = 128, as upstream's profile). Time and peak memory.
* **end_to_end** — one training step (forward, loss, backward, AdamW lr 1e-4) of the bitstream model
  (:class:`~bitstream.model.SDT`, per-bit BCE) and the token model (:class:`~bitstream.model.TokenSDT`,
  token CE) with the same trunk, σ = 1, over a sweep of batch sizes: ms per step, semantic tokens per
  second (B·L per step time), peak memory. An out-of-memory is recorded as a row (``status = oom``) and
  ends that model's sweep.
* **inference** — DDIM (Euler) on a Karras grid at a given NFE (spec §11: no entropy tables needed),
  self-conditioning carried when the model has it, over micro-batch sizes: samples/s, denoiser calls/s,
  semantic tokens/s, peak memory. The token model is run by the same sampler on its flattened one-hot
  state with ``logit(softmax(ℓ))`` as the per-coordinate logit (centre 1/V), i.e. the same update.

Common settings (spec §11): synthetic inputs, no data loading, no ``torch.compile``; on CUDA the weights
are cast to bf16 and run under bf16 autocast (``dtype: auto``), on the CPU float32. Each figure is the
median over ``repeats`` timed repetitions after ``warmup`` untimed ones.

**One fresh subprocess per measured point.** Every (kind, model, size) runs in its own
``python -m bitstream.efficiency point`` process, so no point inherits another's allocator caches,
thread pools or autotuning state, and an out-of-memory kills one point, not the sweep.

**Peak memory.**
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the end of the warm-up
  (spec §11): every live tensor — weights, gradients, optimiser state, activations, inputs.
* CPU: PyTorch keeps no allocation counters on the CPU, so we use the kernel's: the process's peak
  resident set (``VmHWM``). After imports and thread set-up, and before any tensor of the point is made,
  the high-water mark is reset (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0) and the resident set is read
  as the baseline; the figure is ``VmHWM − baseline`` at the end of the point, i.e. the largest amount
  of memory the point's tensors (weights, gradients, AdamW state, activations, inputs) ever held —
  the CPU analogue of ``max_memory_allocated`` counted from an empty device. The child runs with a fixed
  glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``) so large tensors are mapped on allocation and
  returned on free, and the resident set follows the live tensors rather than malloc's free lists. On
  the CPU the high-water mark is taken over warm-up and timed steps together: after the first step a
  step only reuses memory that was already touched (freed blocks stay in the allocator), so a reset
  after the warm-up would read zero; the live set of a warm-up step equals that of a timed one.
  Where ``clear_refs`` is unavailable the fallback is ``getrusage(RUSAGE_SELF).ru_maxrss`` minus the
  same baseline (an upper bound; the ``memory_method`` column says which was used).
  Memory figures do not depend on machine load; times do (a shared machine gives pessimistic times).

**Out of memory.** CUDA raises ``torch.OutOfMemoryError``. On the CPU ``memory_budget_mb`` (null = none)
caps the point's data segment (``RLIMIT_DATA``) at baseline + budget, so a sweep ends at a machine-
independent size, as it does on a GPU of that memory; a point the kernel kills is recorded as OOM too.

CLI::

    python -m bitstream.efficiency run --config config/config.yaml        # measure + tables + figures
    python -m bitstream.efficiency measure --params JSON --out-dir results/efficiency
    python -m bitstream.efficiency report --in-dir results/efficiency --tables-dir results/tables \\
        --figures-dir results/figures
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from bitstream.io import config_hash, code_version, parse_json_arg, write_parquet, write_text, stage_main

KINDS = ("analytic", "boundary", "end_to_end", "inference")
MEASURED = KINDS[1:]

# spec §11, analytic table: name -> (B, T, V, d)
ANALYTIC_SETTINGS = {
    "LM1B": (512, 128, 30522, 768),
    "OWT (B=128)": (128, 1024, 65536, 768),
    "OWT (B=512)": (512, 1024, 65536, 768),
    "long context": (16, 8192, 65536, 1024),
    "large vocab": (16, 4096, 128000, 2048),
    "large model/vocab": (8, 4096, 128000, 4096),
}
HEAD_CONTENT_DIM = 64     # C of upstream's boundary profile ("content 64, noisy 64")
HEAD_HIDDEN = 128         # H_h

# The settings `efficiency:` of the config may override (workflow/schemas/config.schema.yaml keeps the
# same defaults: the embedded default's sizes, seconds per point on 2 CPU cores).
DEFAULTS = {
    "device": "auto",            # auto | cpu | cuda
    "dtype": "auto",             # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    "threads": 0,                # CPU threads per point; 0 = the job's cpus
    "warmup": 1,
    "repeats": 3,
    "memory_budget_mb": None,    # CPU: per-point cap on tensor memory; null = none
    "point_timeout_s": 900,
    "boundary": {"batch_size": 4, "seq_lens": [64], "vocab_sizes": [1024, 4096, 16384, 65536, 131072],
                 "embed_dims": [128]},
    "end_to_end": {"vocab_sizes": [4096], "seq_len": 64, "batch_sizes": [2, 8, 32],
                   "architecture": {"embed_dim": 128, "n_blocks": 2, "n_heads": 4, "dim_ff": 384,
                                    "content_dim": 16, "head_hidden": 32, "dropout": 0.0,
                                    "self_condition": False}},
    "inference": {"nfe": 8, "micro_batches": [1, 4, 16]},
}


def with_defaults(params: dict | None) -> dict:
    """``params`` over :data:`DEFAULTS` (one level of nesting merged); unknown keys are errors."""
    params = params or {}
    out = copy.deepcopy(DEFAULTS)
    for key, value in params.items():
        if key == "resources":
            continue
        if key not in DEFAULTS:
            raise ValueError(f"efficiency: unknown key {key!r}; expected one of {sorted(DEFAULTS)}")
        if isinstance(DEFAULTS[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"efficiency.{key}: expected a mapping, got {value!r}")
            unknown = sorted(set(value) - set(DEFAULTS[key]))
            if unknown:
                raise ValueError(f"efficiency.{key}: unknown key(s) {unknown}; expected {sorted(DEFAULTS[key])}")
            out[key].update(value)
        else:
            out[key] = value
    for section, key in (("boundary", "seq_lens"), ("boundary", "vocab_sizes"), ("boundary", "embed_dims"),
                         ("end_to_end", "batch_sizes"), ("end_to_end", "vocab_sizes"), ("inference", "micro_batches")):
        values = out[section][key]
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"efficiency.{section}.{key}: expected a non-empty list of positive integers, got {values!r}")
    if out["repeats"] < 1 or out["warmup"] < 0:
        raise ValueError(f"efficiency: repeats must be >= 1 and warmup >= 0, got {out['repeats']}, {out['warmup']}")
    return out


def bits_for(vocab: int) -> int:
    """P = ⌈log2 V⌉: bits per token for a vocabulary of V ids (spec §1.2)."""
    if vocab < 2:
        raise ValueError(f"vocabulary size must be >= 2, got {vocab}")
    return (vocab - 1).bit_length()


# ---------------------------------------------------------------------------------------------------
# Analytic table (spec §11)


def analytic_table(settings: dict = ANALYTIC_SETTINGS) -> pd.DataFrame:
    """Logit counts, their bf16 sizes and the vocabulary-dependent output weights, per setting.

    Token side: B·T·V logits, output layer d·V weights. Bit side: B·T·P logits (P = ⌈log2 V⌉), and its
    V-dependent output weights are the unpatch d·P·C plus the head's token-to-bit adapter d·P·H_h
    (C = 64, H_h = 128; biases left out on both sides).
    """
    rows = []
    for name, (B, T, V, d) in settings.items():
        P = bits_for(V)
        rows.append({
            "setting": name, "B": B, "T": T, "V": V, "d": d, "P": P,
            "token_logits": B * T * V, "bit_logits": B * T * P, "logit_ratio": V / P,
            "token_logits_bf16_gib": B * T * V * 2 / 2**30, "bit_logits_bf16_mib": B * T * P * 2 / 2**20,
            "token_out_params": d * V, "bit_out_params": d * P * (HEAD_CONTENT_DIM + HEAD_HIDDEN),
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------
# Measurement primitives (run inside one point's process)


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of what runs between :meth:`start` and :meth:`peak` (module docstring).

    CUDA: ``max_memory_allocated`` (reset by :meth:`reset_after_warmup`). CPU: ``VmHWM`` after a reset
    of the high-water mark, minus the resident set at :meth:`start`; fallback ``ru_maxrss``.
    """

    def __init__(self, device, budget_mb: int | None = None):
        import torch

        self.torch, self.device, self.budget_mb = torch, torch.device(device), budget_mb
        self.method = "cuda.max_memory_allocated" if self.device.type == "cuda" else None
        self.baseline = 0

    def start(self) -> None:
        _prime(self.device)
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                    # reset VmHWM to the current resident set
            self.method = "VmHWM-baseline"
        except OSError:
            self.method = "ru_maxrss-baseline"
        self.baseline = _status_kb("VmRSS") or 0
        data = _status_kb("VmData")
        if self.budget_mb and data is not None:     # from here on the point may hold `budget_mb` more
            hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
            soft = data + int(self.budget_mb) * 2**20
            resource.setrlimit(resource.RLIMIT_DATA, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))

    def reset_after_warmup(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
            return int(self.torch.cuda.max_memory_allocated(self.device))
        if self.method == "VmHWM-baseline":
            hwm = _status_kb("VmHWM")
        else:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux
        return max(int(hwm) - self.baseline, 0)


def _prime(device) -> None:
    """Run every kind of op a point uses once on tiny tensors, before the memory baseline.

    The first backward starts autograd's worker thread and the first matmul / softmax / attention
    sets up the math libraries' per-thread buffers; that one-time cost (tens of MiB on the CPU) belongs
    to the process, not to the measured point, so it is paid before :meth:`PeakMemory.start` resets the
    high-water mark.
    """
    import torch
    import torch.nn.functional as F

    lin = torch.nn.Linear(8, 8).to(device)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-4)
    x = torch.randn(2, 4, 8, device=device)
    h = F.layer_norm(lin(x), (8,))
    q = h.view(2, 1, 4, 8)
    h = F.scaled_dot_product_attention(q, q, q).view(2, 4, 8) + F.silu(h)
    loss = F.cross_entropy(h.flatten(0, 1), torch.zeros(8, dtype=torch.long, device=device))
    loss = loss + F.binary_cross_entropy_with_logits(h, torch.sigmoid(h.detach()))
    loss.backward()
    opt.step()
    del lin, opt, x, h, q, loss


def _resolve(settings: dict):
    import torch

    device = settings["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("efficiency.device is 'cuda' but torch sees no CUDA device")
    dtype = settings["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _timed(step, warmup: int, repeats: int, device, memory: PeakMemory) -> list[float]:
    """Run ``step`` warmup + repeats times; -> the timed repeats' wall times in ms."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    memory.reset_after_warmup()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _boundary_point(point: dict, settings: dict, device, dtype, memory: PeakMemory) -> dict:
    """Output head + loss, forward and backward, on synthetic trunk activations (spec §11)."""
    import torch

    from bitstream.diffusion import binary_ce_loss, token_ce_loss
    from bitstream.model import BitHead, SDTConfig, TokenHead

    B, T, V, d, head = point["B"], point["T"], point["V"], point["d"], point["head"]
    P = bits_for(V)
    g = torch.Generator().manual_seed(0)
    memory.start()
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    trunk = torch.randn(B, T, d, generator=g).to(device, dtype).requires_grad_(True)
    t = torch.randn(B, d, generator=g).to(device, dtype)
    sigma = torch.ones(B, device=device)
    ids = torch.randint(0, V, (B, T), generator=g).to(device)
    if head == "token":
        net = TokenHead(d, V).to(device, dtype)
        params = sum(p.numel() for p in net.parameters())

        def step():
            with amp:
                loss = token_ce_loss(net(trunk, t), ids, sigma)
            loss.backward()
            trunk.grad = None
            for p in net.parameters():
                p.grad = None
    else:
        cfg = SDTConfig(embed_dim=d, n_heads=1, content_dim=HEAD_CONTENT_DIM, head_hidden=HEAD_HIDDEN,
                        self_condition=False, dropout=0.0, patch_size=P, seq_len=T)
        net = torch.nn.ModuleDict({"unpatch": torch.nn.Linear(d, P * HEAD_CONTENT_DIM), "head": BitHead(cfg)})
        net = net.to(device, dtype)
        params = sum(p.numel() for p in net.parameters())
        from bitstream.bits import ids_to_bits

        x0 = ids_to_bits(ids.cpu(), P).float().to(device)                         # [B, T·P]
        content = torch.randn(B, T * P, HEAD_CONTENT_DIM, generator=g).to(device, dtype)  # input side

        def step():
            with amp:
                x_rec = net["unpatch"](trunk).reshape(B, T * P, HEAD_CONTENT_DIM)
                loss = binary_ce_loss(net["head"](trunk, x_rec, content, t), x0, sigma)
            loss.backward()
            trunk.grad = None
            for p in net.parameters():
                p.grad = None
    times = _timed(step, settings["warmup"], settings["repeats"], device, memory)
    return {"ms": statistics.median(times), "peak_mem_bytes": memory.peak(), "params": params, "P": P}


def _e2e_models(point: dict, device, dtype):
    """(bit SDT config, token config) sharing one trunk, for an end-to-end or inference point."""
    from bitstream.model import SDTConfig

    V, L = point["V"], point["L"]
    arch = dict(point["architecture"])
    if point["model"] == "bits":
        cfg = SDTConfig(**{**arch, "patch_size": bits_for(V), "seq_len": L, "representation": "bits"})
    else:
        cfg = SDTConfig(**{**arch, "patch_size": bits_for(V), "seq_len": L, "representation": "tokens",
                           "vocab_size": V, "logit_mode": "none"})
    return cfg


def _inputs(cfg, B: int, V: int, device, g):
    """Synthetic clean data at σ = 1: (targets, x_σ). Bits: x0 [B, L·P]; tokens: ids [B, L], one-hot x."""
    import torch
    import torch.nn.functional as F

    from bitstream.bits import ids_to_bits

    ids = torch.randint(0, V, (B, cfg.seq_len), generator=g)
    if cfg.representation == "bits":
        x0 = ids_to_bits(ids, cfg.patch_size).float()
        return x0.to(device), (x0 + torch.randn(x0.shape, generator=g)).to(device)
    x0 = F.one_hot(ids, V).float()
    x = x0 + torch.randn(x0.shape, generator=g)
    del x0
    return ids.to(device), x.to(device)


def _end_to_end_point(point: dict, settings: dict, device, dtype, memory: PeakMemory) -> dict:
    """One training step: forward, loss, backward, AdamW(lr 1e-4) (spec §11)."""
    import torch

    from bitstream.diffusion import binary_ce_loss, denoise_logits, token_ce_loss
    from bitstream.model import build_model

    cfg = _e2e_models(point, device, dtype)
    B, V = point["B"], point["V"]
    g = torch.Generator().manual_seed(0)
    memory.start()
    model = build_model(cfg).to(device, dtype).train()
    params = model.num_params()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target, x = _inputs(cfg, B, V, device, g)
    sigma = torch.ones(B, device=device)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with amp:
            if cfg.representation == "bits":
                loss = binary_ce_loss(denoise_logits(model, x, sigma, None, mode=cfg.logit_mode), target, sigma)
            else:
                loss = token_ce_loss(model(x, sigma), target, sigma)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = _timed(step, settings["warmup"], settings["repeats"], device, memory)
    ms = statistics.median(times)
    return {"ms": ms, "peak_mem_bytes": memory.peak(), "params": params, "P": cfg.patch_size,
            "tokens_per_s": B * cfg.seq_len / (ms / 1e3)}


def _inference_point(point: dict, settings: dict, device, dtype, memory: PeakMemory) -> dict:
    """DDIM on a Karras grid of ``nfe`` points (= nfe calls), one micro-batch of ``B`` samples (spec §11)."""
    import torch

    from bitstream.diffusion import denoise_logits
    from bitstream.model import build_model
    from bitstream.samplers import sample_ddim
    from bitstream.schedule import karras_grid

    cfg = _e2e_models(point, device, dtype)
    B, V, nfe = point["B"], point["V"], point["nfe"]
    g = torch.Generator().manual_seed(0)
    memory.start()
    model = build_model(cfg).to(device, dtype).eval()
    params = model.num_params()
    for p in model.parameters():
        p.requires_grad_(False)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    L = cfg.seq_len
    if cfg.representation == "bits":
        width, center = L * cfg.patch_size, 0.5

        def denoiser(x, s, x0_hat):
            with amp:
                return denoise_logits(model, x, s, x0_hat, mode=cfg.logit_mode, clip=cfg.mf_clip).float()
    else:
        width, center = L * V, 1.0 / V

        def denoiser(x, s, x0_hat):
            sc = None if x0_hat is None else x0_hat.view(-1, L, V)
            with amp:
                logp = torch.log_softmax(model(x.view(-1, L, V), s, sc).float(), dim=-1)
            # per-coordinate logit whose sigmoid is the softmax probability: the sampler's D
            return (logp - torch.log1p(-logp.exp().clamp(max=1 - 1e-7))).view(x.shape[0], -1)
    latents = torch.randn(B, width, generator=g).to(device)
    sigmas = karras_grid(nfe, sigma_min=0.08, sigma_max=80.0)
    sc_mode = "carry" if cfg.self_condition else "none"
    calls = []

    def step():
        calls.append(sample_ddim(denoiser, latents, sigmas, sc_mode=sc_mode, center=center).nfe)

    times = _timed(step, settings["warmup"], settings["repeats"], device, memory)
    s = statistics.median(times) / 1e3
    return {"ms": s * 1e3, "peak_mem_bytes": memory.peak(), "params": params, "P": cfg.patch_size,
            "nfe": calls[-1], "samples_per_s": B / s, "calls_per_s": calls[-1] / s, "tokens_per_s": B * L / s}


POINT_FUNCTIONS = {"boundary": _boundary_point, "end_to_end": _end_to_end_point, "inference": _inference_point}


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def measure_point(kind: str, point: dict, settings: dict) -> dict:
    """Measure one point in this process -> the point plus ms, peak_mem_bytes, ... and ``status``.

    Meant to run in a fresh process (:func:`run_point`); called in a long-lived process the CPU memory
    figure can read low, because freed memory the allocator kept is reused without new resident pages.
    """
    import torch

    device, dtype = _resolve(settings)
    threads = int(settings.get("threads") or 0) or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    row = {"kind": kind, **{k: v for k, v in point.items() if k != "architecture"}, "device": device.type,
           "dtype": str(dtype).replace("torch.", ""), "threads": threads if device.type == "cpu" else None,
           "warmup": settings["warmup"], "repeats": settings["repeats"]}
    memory = PeakMemory(device, settings.get("memory_budget_mb"))
    try:
        row.update(POINT_FUNCTIONS[kind](point, settings, device, dtype, memory))
        row["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - an OOM is a measured outcome, anything else is re-raised
        if not _is_oom(err):
            raise
        row.update({"status": "oom", "error": (str(err).strip() or type(err).__name__).splitlines()[0][:300]})
    row["memory_method"] = memory.method
    return row


def run_point(kind: str, point: dict, settings: dict, timeout: float | None = None) -> dict:
    """:func:`measure_point` in a fresh ``python -m bitstream.efficiency point`` process (module docstring).

    A child killed by a signal (the kernel's OOM killer) is recorded as ``status = oom``; any other
    failure raises with the child's stderr.
    """
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")   # fixed threshold: big blocks mmapped and unmapped
    spec = json.dumps({"kind": kind, "point": point, "settings": settings})
    cmd = [sys.executable, "-m", "bitstream.efficiency", "point", "--spec", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                          timeout=timeout or settings.get("point_timeout_s"))
    if proc.returncode < 0 or proc.returncode == 137:
        row = {"kind": kind, **{k: v for k, v in point.items() if k != "architecture"}, "status": "oom",
               "error": f"killed by signal {-proc.returncode if proc.returncode < 0 else 9}"}
        return row
    if proc.returncode != 0:
        raise RuntimeError(f"efficiency {kind} point {point}: the measuring process failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# Sweeps


def boundary_points(settings: dict) -> list[dict]:
    b = settings["boundary"]
    return [{"head": head, "B": b["batch_size"], "T": T, "V": V, "d": d}
            for T in b["seq_lens"] for V in b["vocab_sizes"] for d in b["embed_dims"] for head in ("token", "bit")]


def measure(settings: dict, progress=print) -> dict[str, pd.DataFrame]:
    """Every measured table (boundary, end_to_end, inference) of the settings, one process per point."""
    out = {"boundary": []}
    for point in boundary_points(settings):
        out["boundary"].append(run_point("boundary", point, settings))
        progress(_brief(out["boundary"][-1]))
    e2e, inf = settings["end_to_end"], settings["inference"]
    for kind, sizes, extra in (("end_to_end", e2e["batch_sizes"], {}),
                               ("inference", inf["micro_batches"], {"nfe": inf["nfe"]})):
        out[kind] = []
        for V in e2e["vocab_sizes"]:
            base = {"V": V, "L": e2e["seq_len"], "architecture": e2e["architecture"]}
            for model in ("bits", "tokens"):
                for B in sorted(sizes):
                    row = run_point(kind, {**base, **extra, "model": model, "B": B}, settings)
                    out[kind].append(row)
                    progress(_brief(row))
                    if row["status"] == "oom":    # larger batches would run out too: the sweep ends
                        break
    return {k: pd.DataFrame(v) for k, v in out.items()}


def _brief(row: dict) -> str:
    what = row.get("head") or row.get("model")
    size = " ".join(f"{k}={row[k]}" for k in ("B", "T", "L", "V", "d") if k in row)
    if row["status"] != "ok":
        return f"{row['kind']:10s} {what:6s} {size}: {row['status']}"
    return f"{row['kind']:10s} {what:6s} {size}: {row['ms']:9.2f} ms  {row['peak_mem_bytes'] / 2**20:9.1f} MiB"


def write_measurements(settings: dict, out_dir, params_for_hash: dict | None = None) -> dict[str, pd.DataFrame]:
    """Measure and write ``{out_dir}/{analytic,boundary,end_to_end,inference}.parquet`` (atomically)."""
    out_dir = Path(out_dir)
    tables = {"analytic": analytic_table(), **measure(settings, progress=lambda s: print(s, file=sys.stderr))}
    prov = {"code_version": code_version(), "config_hash": config_hash(params_for_hash or settings)}
    for name, df in tables.items():
        df = df.assign(**prov)
        write_parquet(out_dir / f"{name}.parquet", df)
        tables[name] = df
    return tables


# ---------------------------------------------------------------------------------------------------
# Report: tables (md, tex) and figures from the parquet files alone


def read_measurements(in_dir) -> dict[str, pd.DataFrame]:
    in_dir = Path(in_dir)
    out = {}
    for name in KINDS:
        path = in_dir / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found (run `python -m bitstream.efficiency measure` first)")
        out[name] = pd.read_parquet(path)
    return out


def boundary_comparison(boundary: pd.DataFrame) -> pd.DataFrame:
    """One row per (T, V, d): both heads' time and memory side by side, token/bit ratios, analytic ratio."""
    keys = ["B", "T", "V", "d"]
    cols = ["ms", "peak_mem_bytes", "status"]
    b = boundary.assign(**{c: boundary.get(c, float("nan")) for c in cols})
    b.loc[b["status"] != "ok", ["ms", "peak_mem_bytes"]] = float("nan")    # an OOM has no figures
    tok = b[b["head"] == "token"].set_index(keys)[cols]
    bit = b[b["head"] == "bit"].set_index(keys)[cols]
    df = tok.merge(bit, left_index=True, right_index=True, how="outer", suffixes=("_token", "_bit")).reset_index()
    df = df.rename(columns={"ms_token": "token_ms", "ms_bit": "bit_ms", "status_token": "token_status",
                            "status_bit": "bit_status",
                            "peak_mem_bytes_token": "token_mem_bytes", "peak_mem_bytes_bit": "bit_mem_bytes"})
    df["P"] = df["V"].map(bits_for)
    df["mem_ratio"] = df["token_mem_bytes"] / df["bit_mem_bytes"]
    df["time_ratio"] = df["token_ms"] / df["bit_ms"]
    df["analytic_ratio"] = df["V"] / df["V"].map(bits_for)
    return df.sort_values(["T", "d", "V"]).reset_index(drop=True)


def _mib(b) -> str:
    return "—" if b is None or pd.isna(b) else f"{b / 2**20:,.1f}"


def _oom(status, text: str) -> str:
    return "OOM" if status == "oom" else text


def _f(v, fmt="{:,.2f}") -> str:
    return "—" if v is None or pd.isna(v) else fmt.format(v)


def _sections(tables: dict[str, pd.DataFrame]) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, note, header, rows) of each part of the efficiency table, shared by md and tex."""
    a = tables["analytic"]
    analytic = ("Analytic: logits and output layer (spec §11)",
                "Token logits B·T·V vs bit logits B·T·⌈log2 V⌉ and their bf16 sizes; output weights: "
                "token d·V, bit d·P·(C + H_h) with C = 64, H_h = 128.",
                ["setting", "B", "T", "V", "d", "P", "token logits", "bit logits", "ratio",
                 "token bf16 GiB", "bit bf16 MiB", "token out params", "bit out params"],
                [[r.setting, f"{r.B}", f"{r.T}", f"{r.V:,}", f"{r.d}", f"{r.P}", f"{r.token_logits:,}",
                  f"{r.bit_logits:,}", f"{r.logit_ratio:,.0f}", f"{r.token_logits_bf16_gib:,.2f}",
                  f"{r.bit_logits_bf16_mib:,.2f}", f"{r.token_out_params:,}", f"{r.bit_out_params:,}"]
                 for r in a.itertuples()])
    b = boundary_comparison(tables["boundary"])
    dev = _device_note(tables["boundary"])
    boundary = ("Boundary: output head + loss, forward and backward",
                f"Synthetic trunk activations; median over repeats; peak memory from an empty start {dev}.",
                ["B", "T", "d", "V", "P", "token MiB", "bit MiB", "mem ratio", "analytic ratio",
                 "token ms", "bit ms", "time ratio"],
                [[f"{r.B}", f"{r.T}", f"{r.d}", f"{r.V:,}", f"{r.P}", _oom(r.token_status, _mib(r.token_mem_bytes)),
                  _oom(r.bit_status, _mib(r.bit_mem_bytes)), _f(r.mem_ratio, "{:,.1f}"),
                  _f(r.analytic_ratio, "{:,.0f}"), _oom(r.token_status, _f(r.token_ms)),
                  _oom(r.bit_status, _f(r.bit_ms)), _f(r.time_ratio, "{:,.1f}")] for r in b.itertuples()])
    e = tables["end_to_end"]
    e2e = ("End to end: one training step (forward, loss, backward, AdamW)",
           f"Same trunk; bits: per-bit BCE, tokens: token CE; σ = 1 {_device_note(e)}.",
           ["model", "params", "B", "L", "V", "ms/step", "tokens/s", "peak MiB", "status"],
           [[r.model, _f(r.params, "{:,.0f}"), f"{r.B}", f"{r.L}", f"{r.V:,}", _f(r.ms),
             _f(r.tokens_per_s, "{:,.0f}"), _mib(r.peak_mem_bytes), r.status] for r in e.itertuples()])
    i = tables["inference"]
    inf = ("Inference: DDIM on a Karras grid",
           f"Per micro-batch of B samples; calls = NFE {_device_note(i)}.",
           ["model", "B", "NFE", "samples/s", "calls/s", "tokens/s", "peak MiB", "status"],
           [[r.model, f"{r.B}", _f(getattr(r, "nfe", None), "{:.0f}"), _f(getattr(r, "samples_per_s", None)),
             _f(getattr(r, "calls_per_s", None)), _f(getattr(r, "tokens_per_s", None), "{:,.0f}"),
             _mib(getattr(r, "peak_mem_bytes", None)), r.status] for r in i.itertuples()])
    return [analytic, boundary, e2e, inf]


def _device_note(df: pd.DataFrame) -> str:
    if "device" not in df or df["device"].dropna().empty:
        return ""
    r = df.dropna(subset=["device"]).iloc[0]
    threads = f", {int(r['threads'])} thread(s)" if r.get("threads") is not None and not pd.isna(r.get("threads")) else ""
    method = r.get("memory_method") or ""
    return f"({r['device']}, {r['dtype']}{threads}; memory: {method})"


def to_markdown(tables: dict[str, pd.DataFrame]) -> str:
    out = ["# Efficiency: O(log V) bit logits vs O(V) token logits (spec §11)", ""]
    for title, note, header, rows in _sections(tables):
        out += [f"## {title}", "", note, "", "| " + " | ".join(header) + " |",
                "|" + "|".join("---" if j == 0 else "---:" for j in range(len(header))) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def _tex(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("—", "--"), ("σ", r"$\sigma$"), ("·", r"$\cdot$"), ("⌈", r"$\lceil$"), ("⌉", r"$\rceil$"),
                 ("§", r"\S{}")):
        s = s.replace(a, b)
    return s


def to_latex(tables: dict[str, pd.DataFrame]) -> str:
    out = [r"% Efficiency tables (bitstream.efficiency, spec §11); needs \usepackage{booktabs}"]
    for title, note, header, rows in _sections(tables):
        out += [f"% {title}: {note}", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule",
                " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
        out += [" & ".join(_tex(c) for c in r) + r" \\" for r in rows]
        out += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(out)


FIGURES = ("efficiency_head", "efficiency_training", "efficiency_inference")


def plot_figures(tables: dict[str, pd.DataFrame], figures_dir) -> list[Path]:
    """Head memory and time against V (log–log), tokens/s and memory against batch, inference rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bitstream.io import atomic_path

    figures_dir = Path(figures_dir)
    paths = []

    def save(fig, name):
        fig.tight_layout()
        path = figures_dir / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        paths.append(path)

    styles = {"token": ("tab:red", "o", "token head (softmax over V)"),
              "bit": ("tab:blue", "s", "bit head (⌈log2 V⌉ logits)"),
              "tokens": ("tab:red", "o", "token model"), "bits": ("tab:blue", "s", "bitstream model")}

    b = tables["boundary"]
    b = b[b["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, col, label in ((axes[0], "peak_mem_bytes", "peak memory (MiB)"), (axes[1], "ms", "time per step (ms)")):
        for (head, T, d), grp in b.groupby(["head", "T", "d"]):
            color, marker, name = styles[head]
            grp = grp.sort_values("V")
            y = grp[col] / 2**20 if col == "peak_mem_bytes" else grp[col]
            ax.plot(grp["V"], y, marker=marker, color=color, label=f"{name}, T={T}, d={d}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("head + loss, forward + backward: memory")
    axes[1].set_title("head + loss, forward + backward: time")
    axes[0].legend(fontsize=8)
    save(fig, FIGURES[0])

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    e = tables["end_to_end"]
    vocabs = sorted(e["V"].unique()) if len(e) else []
    dashes = {V: ls for V, ls in zip(vocabs, ["-", "--", ":", "-."] * 4)}
    for (model, V), grp in e.groupby(["model", "V"]):
        color, marker, name = styles[model]
        name = f"{name}, V = {V:,}" if len(vocabs) > 1 else name
        okg = grp[grp["status"] == "ok"].sort_values("B")
        axes[0].plot(okg["B"], okg["tokens_per_s"], marker=marker, color=color, ls=dashes[V], label=name)
        axes[1].plot(okg["B"], okg["peak_mem_bytes"] / 2**20, marker=marker, color=color, ls=dashes[V], label=name)
        for B in grp[grp["status"] == "oom"]["B"]:
            axes[0].axvline(B, color=color, ls=":", alpha=0.7)
            axes[0].annotate(f"{name}: OOM", (B, axes[0].get_ylim()[0]), color=color, fontsize=8, rotation=90)
    for ax, label in ((axes[0], "semantic tokens / s"), (axes[1], "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("training step throughput" + (f" (V = {vocabs[0]:,})" if len(vocabs) == 1 else ""))
    axes[1].set_title("training step memory")
    save(fig, FIGURES[1])

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    i = tables["inference"]
    i = i[i["status"] == "ok"] if "status" in i else i
    vocabs = sorted(i["V"].unique()) if len(i) else []
    dashes = {V: ls for V, ls in zip(vocabs, ["-", "--", ":", "-."] * 4)}
    for (model, V), grp in i.groupby(["model", "V"]):
        color, marker, name = styles[model]
        name = f"{name}, V = {V:,}" if len(vocabs) > 1 else name
        grp = grp.sort_values("B")
        axes[0].plot(grp["B"], grp["samples_per_s"], marker=marker, color=color, ls=dashes[V], label=name)
        axes[1].plot(grp["B"], grp["calls_per_s"], marker=marker, color=color, ls=dashes[V], label=name)
    nfe = int(i["nfe"].iloc[0]) if len(i) else "?"
    for ax, label in ((axes[0], f"samples / s (NFE {nfe})"), (axes[1], "denoiser calls / s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("micro-batch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("generation throughput")
    axes[1].set_title("denoiser call rate")
    save(fig, FIGURES[2])
    return paths


def write_report(in_dir, tables_dir, figures_dir) -> dict[str, pd.DataFrame]:
    """``efficiency.{md,tex}`` under ``tables_dir`` and the figures under ``figures_dir``, from parquet alone."""
    tables = read_measurements(in_dir)
    write_text(Path(tables_dir) / "efficiency.md", to_markdown(tables))
    write_text(Path(tables_dir) / "efficiency.tex", to_latex(tables))
    plot_figures(tables, figures_dir)
    return tables


# ---------------------------------------------------------------------------------------------------
# CLI


def _settings_from_config(path) -> tuple[dict, dict]:
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: config file not found")
    raw = (yaml.safe_load(path.read_text()) or {}).get("efficiency") or {}
    return with_defaults(raw), raw


@stage_main("efficiency")
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bitstream.efficiency", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure, then write tables and figures")
    run.add_argument("--config", default="config/config.yaml", help="a workflow config; its `efficiency:` section")
    run.add_argument("--results", default="results", help="results root (efficiency/, tables/, figures/ below it)")
    m = sub.add_parser("measure", help="measure; write {out-dir}/{analytic,boundary,end_to_end,inference}.parquet")
    m.add_argument("--params", default="{}", help="the config's `efficiency:` section as JSON (or @file)")
    m.add_argument("--threads", type=int, default=None, help="override `threads` (the job's cpus)")
    m.add_argument("--out-dir", required=True)
    r = sub.add_parser("report", help="efficiency.{md,tex} and figures from the parquet files")
    r.add_argument("--in-dir", required=True)
    r.add_argument("--tables-dir", required=True)
    r.add_argument("--figures-dir", required=True)
    p = sub.add_parser("point", help="(internal) measure one point in this process; prints one JSON line")
    p.add_argument("--spec", required=True)
    args = ap.parse_args(argv)
    try:
        if args.command == "point":
            spec = json.loads(args.spec)
            row = measure_point(spec["kind"], spec["point"], spec["settings"])
            print(json.dumps(row))
            return
        if args.command == "run":
            settings, raw = _settings_from_config(args.config)
            res = Path(args.results)
            write_measurements(settings, res / "efficiency", raw)
            tables = write_report(res / "efficiency", res / "tables", res / "figures")
        elif args.command == "measure":
            raw = parse_json_arg(args.params, "--params")
            settings = with_defaults(raw)
            if args.threads is not None and not settings["threads"]:
                settings["threads"] = args.threads
            write_measurements(settings, args.out_dir, raw)
            return
        else:
            tables = write_report(args.in_dir, args.tables_dir, args.figures_dir)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise SystemExit(f"efficiency: {err}")
    print(to_markdown(tables), file=sys.stderr)


if __name__ == "__main__":
    main()
