"""An order-preserving, memory-bounded parallel map for the data stages.

``multiprocessing.Pool.imap`` keeps results in order but its feeder thread drains the input iterator
as fast as it can, which would pull a whole corpus into memory. :func:`ordered_map` keeps at most
``window`` chunks in flight and yields results in input order, so a stage streams a file of any size
with a fixed amount of memory and writes its output deterministically (identical for 1 or N workers).

Workers are started with the ``spawn`` method: the parent has usually used the Rust thread pool of
``tokenizers`` already, and a forked child of such a process silently loses its parallelism (or
deadlocks); a spawned child starts clean and sets its own ``RAYON_NUM_THREADS`` before importing it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from typing import Any, Callable, Iterable, Iterator


def chunked(items: Iterable[Any], size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter), without reading ahead."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _init_worker(initializer: Callable | None, initargs: tuple) -> None:
    # One Rust thread per worker process: the parallelism comes from the processes.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if initializer is not None:
        initializer(*initargs)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 1,
                initializer: Callable | None = None, initargs: tuple = (),
                window: int | None = None) -> Iterator[Any]:
    """``map(fn, items)`` over ``workers`` processes, in order, with at most ``window`` items in flight.

    With ``workers <= 1`` everything runs in this process (``initializer`` is called here once), so
    the single-worker path has no pickling or start-up cost. ``fn`` and ``initializer`` must be
    module-level functions (picklable).
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    window = window or 2 * workers
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(initializer, initargs)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
