"""CPU behaviour of the torch stages (issue 12): subnormal floats are flushed, and the GPU code paths
that can run on a CPU (bf16 autocast, torch.compile) are exercised here, so a dtype or graph-break bug
does not wait for the first GPU job."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitstream import checkpoint as ckpt_io
from bitstream import cpu
from bitstream import train as tr
from test_train_loop import BITS, SEQ_LEN, make_cache, params

# The embedded default's block shape at a tiny length: big enough that AdamW's second moments of
# barely-moving weights underflow into subnormals within a few steps when nothing flushes them.
SUBNORMAL_ARCH = {"embed_dim": 128, "n_blocks": 1, "n_heads": 4, "dim_ff": 384, "content_dim": 16,
                  "head_hidden": 32, "dropout": 0.0}


def _state_subnormals(out_dir) -> tuple[int, int]:
    state = ckpt_io.load(out_dir / "checkpoints" / "last.pt", map_location="cpu")
    opt = [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    return cpu.count_subnormals(opt), cpu.count_subnormals(state["model"].values())


def test_training_leaves_no_subnormal_state(tmp_path, monkeypatch):
    cache = make_cache(tmp_path / "cache")
    p = params(steps=6, checkpoint_every=6, val_every=6, warmup_steps=2)
    p["architecture"].update(SUBNORMAL_ARCH)
    monkeypatch.setenv(cpu.KEEP_SUBNORMALS_ENV, "1")  # before issue 12: nothing flushed
    tr.train(cache, BITS, SEQ_LEN, p, tmp_path / "kept", device="cpu", quiet=True)
    kept_opt, _ = _state_subnormals(tmp_path / "kept")
    monkeypatch.delenv(cpu.KEEP_SUBNORMALS_ENV)
    tr.train(cache, BITS, SEQ_LEN, p, tmp_path / "flushed", device="cpu", quiet=True)
    flushed = _state_subnormals(tmp_path / "flushed")
    assert kept_opt > 0, "the set-up should produce subnormals when they are kept"
    assert flushed == (0, 0)


def test_setup_torch_sets_threads_and_flushes(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(cpu.KEEP_SUBNORMALS_ENV, "1")
        cpu.setup_torch(1)
        tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32, kept
        assert cpu.count_subnormals([tiny]) == 1 and float(tiny * 1.0) > 0.0
        monkeypatch.delenv(cpu.KEEP_SUBNORMALS_ENV)
        assert cpu.setup_torch(1) == 1 and torch.get_num_threads() == 1
        assert float(tiny * 1.0) == 0.0  # flushed: a subnormal operand counts as 0
    finally:
        torch.set_num_threads(before)
        cpu.flush_subnormals()


def test_bf16_autocast_training_and_sampling_on_cpu(tmp_path):
    """precision: bf16 runs the training step under bf16 autocast; the sampler's autocast path too."""
    from bitstream.sample import generate_bits
    from bitstream.samplers import model_denoiser, plan_from_spec

    cache = make_cache(tmp_path / "cache")
    summary = tr.train(cache, BITS, SEQ_LEN, params(steps=4, precision="bf16", checkpoint_every=4, val_every=4),
                       tmp_path / "bf16", device="cpu", quiet=True)
    assert summary["step"] == 4 and np.isfinite(summary["loss_last"]) and np.isfinite(summary["val_loss_last"])
    model, meta = ckpt_io.load_model(str(tmp_path / "bf16" / "checkpoints" / "final.pt"), device="cpu")
    denoiser = model_denoiser(model, autocast=True)
    plan = plan_from_spec({"sampler": "ddim_karras", "nfe": 4, "gamma": 0.2, "window": "full", "sc_mode": "carry"})
    bits, stats = generate_bits(denoiser, plan, BITS * SEQ_LEN, 4, 4, seed=0, device="cpu")
    assert stats["network_calls"] == 4
    assert bits.shape == (4, BITS * SEQ_LEN) and set(np.unique(bits)) <= {0, 1}


def test_compiled_training_step_on_cpu(tmp_path, monkeypatch):
    """compile: true for training steps. Cheap: dynamo captures the graphs and AOT autograd traces the
    backward (where graph breaks and dtype errors show up) with the ``aot_eager`` backend; inductor's
    C++ code generation would take minutes on 2 cores and adds nothing the GPU's Triton path shares."""
    import torch._dynamo

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cache = make_cache(tmp_path / "cache")
    p = params(steps=2, compile=True, checkpoint_every=2, val_every=2, val_batches=1)
    p["architecture"].update(embed_dim=16, n_heads=2, dim_ff=32, content_dim=4, head_hidden=8)
    summary = tr.train(cache, BITS, SEQ_LEN, p, tmp_path / "compiled", device="cpu", quiet=True)
    assert summary["step"] == 2 and np.isfinite(summary["loss_last"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the compiled net really ran
    torch._dynamo.reset()
