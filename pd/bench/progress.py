"""A one-line progress bar on stderr (no tqdm).

On a terminal the line is redrawn in place at most ten times a second; into a
file or pipe, a new line is written at most every ten seconds, and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 30
TERMINAL_REDRAW_S = 0.1
LOG_REDRAW_S = 10.0


class ProgressBar:
    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.num_done = 0
        self.num_failed = 0
        self._is_terminal = self.stream.isatty()
        self._interval_s = TERMINAL_REDRAW_S if self._is_terminal else LOG_REDRAW_S
        self._start = time.monotonic()
        self._last_draw = self._start
        self._is_drawn = False  # whether the current state is on screen

    def advance(self, is_success: bool) -> None:
        self.num_done += 1
        self.num_failed += not is_success
        self._is_drawn = False
        now = time.monotonic()
        if now - self._last_draw >= self._interval_s:
            self._draw(now)

    def close(self) -> None:
        if not self._is_drawn:
            self._draw(time.monotonic())
        if self.enabled and self._is_terminal:
            self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        filled = BAR_WIDTH * self.num_done // max(self.total, 1)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return (
            f"pd-bench [{bar}] {self.num_done}/{self.total} "
            f"({self.num_failed} failed) {now - self._start:.1f} s"
        )

    def _draw(self, now: float) -> None:
        self._last_draw = now
        self._is_drawn = True
        if self.enabled:
            text = "\r" + self.line(now) if self._is_terminal else self.line(now) + "\n"
            self.stream.write(text)
            self.stream.flush()
