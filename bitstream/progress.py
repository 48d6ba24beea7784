"""Progress that a person can follow in a terminal and in a SLURM log file.

A tqdm bar redraws with carriage returns, which turns into one unreadable line in a log file. When
standard error is not a terminal this prints a plain line every ``interval`` seconds instead, with
throughput and ETA.
"""

from __future__ import annotations

import sys
import time


def _fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """``with Progress(total, "tokenize", unit="tok") as p: p.update(n, loss=...)``."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", interval: float = 10.0,
                 stream=None, initial: int = 0):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.interval = interval
        self.stream = stream or sys.stderr
        self.n = initial
        self._initial = initial
        self._t0 = time.monotonic()
        self._last = self._t0
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream,
                             dynamic_ncols=True, unit_scale=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self._t0
        return (self.n - self._initial) / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1, **fields) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix({k: _fmt(v) for k, v in fields.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval or (self.total is not None and self.n >= self.total):
            self._last = now
            self._print(fields)

    def _print(self, fields) -> None:
        rate = self.rate
        parts = [f"[{self.desc}] {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_fmt_seconds((self.total - self.n) / rate)}")
        parts += [f"{k}={_fmt(v)}" for k, v in fields.items()]
        print("  ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._print({"done": f"{time.monotonic() - self._t0:.1f}s"})


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
