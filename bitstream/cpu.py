"""How a stage runs torch on a CPU: subnormal floats flushed to zero, intra-op threads = the job's CPUs.

Every stage that runs torch calls :func:`setup_torch` first (train, judge, sample, metrics, vlb).

**Subnormals.** After a few AdamW steps a large share of the second-moment state ``exp_avg_sq``
(squared gradients of weights that barely move, ~1e-40) is subnormal, and so are values computed
from it. On many x86 CPUs an arithmetic instruction with a subnormal operand or result takes a
micro-code assist of ~100 cycles: issue 12 measured a training step of 4.5 s kept vs 0.29 s flushed.
The AMD EPYC of the development machine shows almost none (1.01-1.08x;
``benchmarks/bench_train.py --subnormals both``). We *flush* them (``torch.set_flush_denormal``,
FTZ/DAZ on the SSE control register of this thread) rather than remove their cause: the cause is
legitimate underflow of squared gradients (any eps in AdamW acts on ``sqrt(v)``, not ``v``), a
subnormal ``v`` and a zero ``v`` give the same update to float32 rounding (``sqrt(v) << eps``), and
flushing is what a GPU does by default for these kernels anyway. The change of numbers is below
1e-38 in absolute terms. On a GPU the call is a no-op for CUDA kernels.

``BITSTREAM_KEEP_SUBNORMALS=1`` in the environment leaves subnormals alone (benchmarks use it to
measure the "before").

**Threads.** ``snakemake --cores N`` counts a job's ``threads:``, which the rules set to the
``cpus`` of the job's config block (``workflow/rules/common.smk``), and the job passes the same
number to ``--threads`` here: the sum of compute threads never exceeds N. With OpenMP's spinning
waits, two 2-thread jobs on two cores are far slower than one after the other.
"""

from __future__ import annotations

import os

KEEP_SUBNORMALS_ENV = "BITSTREAM_KEEP_SUBNORMALS"


def flush_subnormals() -> bool:
    """Flush subnormal floats to zero in this thread's CPU arithmetic; returns whether it is on."""
    import torch

    if os.environ.get(KEEP_SUBNORMALS_ENV, "") not in ("", "0"):
        torch.set_flush_denormal(False)
        return False
    return bool(torch.set_flush_denormal(True))  # False on CPUs without FTZ/DAZ (then nothing changes)


def setup_torch(threads: int | None) -> int:
    """Flush subnormals and set torch's intra-op threads to ``threads`` (None/0: leave torch's default).

    Returns the number of intra-op threads in effect.
    """
    import torch

    flush_subnormals()
    if threads is not None and int(threads) > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def count_subnormals(tensors) -> int:
    """Number of subnormal values (0 < |x| < finfo.tiny) over floating tensors (tests, diagnostics)."""
    import torch

    n = 0
    for t in tensors:
        if not torch.is_tensor(t) or not t.is_floating_point() or t.numel() == 0:
            continue
        a = t.detach().abs()
        n += int(((a > 0) & (a < torch.finfo(t.dtype).tiny)).sum())
    return n
