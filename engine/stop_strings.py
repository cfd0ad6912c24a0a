"""Stop-string matching over a stream of text deltas."""

from __future__ import annotations


class StopStringMatcher:
    """Finds the first stop string in a text stream and cuts the stream there.

    Text that could be the start of a stop string is held back until it is either
    completed (and cut) or ruled out, so nothing emitted is ever retracted. With
    ``include_stop_str_in_output`` nothing needs holding back: the text kept in
    the output always reaches to the end of the stop string.

    NOTE: when several stops match, the one that ends first wins (ties: the one
    that starts first). That is what a character-by-character stream sees first,
    so the result does not depend on how the text was split into deltas.
    """

    def __init__(self, stops: list[str], include_stop_str_in_output: bool) -> None:
        if any(not stop for stop in stops):
            raise ValueError(f"stop strings must be non-empty, got {stops!r}")
        self._stops = list(stops)
        self._include_stop = include_stop_str_in_output
        self._max_tail_len = max((len(stop) for stop in stops), default=1) - 1
        # Last seen characters (emitted or held), long enough to hold all but the
        # last character of any stop; its final _num_held characters are not emitted.
        self._tail = ""
        self._num_held = 0
        self.matched: str | None = None
        self.is_finished = False

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Returns (text safe to emit now, the stop string that matched or None)."""
        if self.is_finished:
            raise RuntimeError("feed() after the stream matched a stop or was flushed")
        if not self._stops:
            return delta, None
        buffer = self._tail + delta
        emit_from = len(self._tail) - self._num_held
        match = _first_match(buffer, self._stops)
        if match is not None:
            start, stop = match
            end = start + len(stop) if self._include_stop else start
            self._finish()
            self.matched = stop
            return buffer[emit_from : max(end, emit_from)], stop
        num_held = 0 if self._include_stop else _partial_stop_len(buffer, self._stops)
        self._num_held = num_held
        self._tail = buffer[max(0, len(buffer) - self._max_tail_len) :]
        return buffer[emit_from : len(buffer) - num_held], None

    def flush(self) -> str:
        """Ends the stream without a match and returns the held-back text."""
        held = self._tail[len(self._tail) - self._num_held :] if self._num_held else ""
        self._finish()
        return held

    def _finish(self) -> None:
        self.is_finished = True
        self._tail = ""
        self._num_held = 0


def _first_match(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(start, stop) of the match that ends first in ``text``, or None."""
    best: tuple[int, int, str] | None = None
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        candidate = (start + len(stop), start, stop)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return None if best is None else (best[1], best[2])


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop."""
    longest = max(len(stop) for stop in stops) - 1
    for length in range(min(longest, len(text)), 0, -1):
        suffix = text[len(text) - length :]
        if any(len(stop) > length and stop.startswith(suffix) for stop in stops):
            return length
    return 0
