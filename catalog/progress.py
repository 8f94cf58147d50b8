"""Byte progress for long uploads/downloads: a callback, or one updating line on a TTY stderr.

``progress`` arguments across the API accept None (auto: only when stderr is a terminal, so
tests and logs stay quiet), True/False, or a callable ``fn(label, done_bytes, total_bytes)``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

ProgressArg = bool | Callable[[str, int, int], None] | None


class Progress:
    def __init__(self, label: str, total: int, progress: ProgressArg = None, interval: float = 0.2):
        self.label, self.total, self.done = label, total, 0
        self.fn = progress if callable(progress) else None
        self.tty = self.fn is None and (progress is True or (progress is None and sys.stderr.isatty()))
        self.interval = interval
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()
        self.printed = False

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += n
            if self.fn is not None:
                self.fn(self.label, self.done, self.total)
            elif self.tty and time.monotonic() - self.last >= self.interval:
                self._print()

    def _print(self) -> None:
        self.last = time.monotonic()
        rate = self.done / max(self.last - self.start, 1e-6) / 1e6
        pct = 100.0 * self.done / self.total if self.total else 100.0
        sys.stderr.write(f"\r{self.label}: {self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB "
                         f"({pct:.0f}%, {rate:.1f} MB/s)")
        sys.stderr.flush()
        self.printed = True

    def close(self) -> None:
        with self.lock:
            if self.tty and self.printed:
                self._print()
                sys.stderr.write("\n")
                sys.stderr.flush()
