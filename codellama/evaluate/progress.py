"""A one-line progress bar on stderr (no dependency): ``generate  37/164 [#####.....]  2.1/s  0:00:17``."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """Counts finished items and redraws at most ten times a second; ``enabled=False`` makes it silent.

    On a terminal the bar is redrawn in place; written to a file or a pipe (a CI log), where a carriage return
    redraws nothing, it is a line at each tenth of the way and at the end instead.
    """

    def __init__(self, total: int, label: str, enabled: bool = True, stream: Optional[TextIO] = None,
                 width: int = 30):
        self.total, self.label, self.enabled, self.width = total, label, enabled, width
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._start = time.monotonic()
        self._drawn = 0.0
        self._drawn_done = -1
        self.note = ""
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._tenth = -1  # the last tenth of the way written as a line (not on a terminal)

    def update(self, n: int = 1, note: Optional[str] = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        now = time.monotonic()
        if not self.enabled:
            return
        if not self.terminal:
            tenth = 10 * self.done // self.total if self.total else 10
            if tenth > self._tenth:
                self._tenth = tenth
                self._draw(now)
            return
        if now - self._drawn >= 0.1 or self.done >= self.total:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn_done = self.done
        elapsed = now - self._start
        filled = int(self.width * self.done / self.total) if self.total else self.width
        rate = self.done / elapsed if elapsed > 0 else 0.0
        line = (f"{self.label} {self.done}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{rate:.1f}/s {int(elapsed) // 60}:{int(elapsed) % 60:02d} {self.note}")
        self.stream.write(f"\r{line}" if self.terminal else f"{line.rstrip()}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self._drawn_done != self.done:
                self._draw(time.monotonic())
            if self.terminal:
                self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
