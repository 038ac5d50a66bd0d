"""A one-line progress bar for long transfers: bytes, rate, ETA.

Quiet under ``--quiet`` and when stderr is not a terminal, so logs and pipes never fill with carriage returns.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from fedq.units import human_bytes

_REDRAW_SECONDS = 0.2
_WIDTH = 24


class Progress:
    """Call ``update(n)`` as bytes move and ``close()`` at the end; ``set_total`` when the size is learnt."""

    def __init__(
        self, label: str, total: int | None = None, *, quiet: bool = False, stream: TextIO | None = None
    ):
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = not quiet and self.stream.isatty()
        self._start = time.monotonic()
        self._drawn = 0.0

    def set_total(self, total: int) -> None:
        self.total = total

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._drawn >= _REDRAW_SECONDS:
            self._drawn = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label} {human_bytes(self.done)}"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * _WIDTH)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
            sizes = f"{human_bytes(self.done)}/{human_bytes(self.total)}"
            text = f"{self.label} [{bar:<{_WIDTH}}] {sizes} ETA {eta_text}"
        return f"{text} {human_bytes(rate)}/s"

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line(time.monotonic()) + "\x1b[K\n")
            self.stream.flush()
