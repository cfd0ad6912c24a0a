"""Work other threads hand to the engine loop, which alone touches the engine.

gRPC handlers (a decode rank's Reserve and Commit) and transfer threads (a prefill
rank's finished hand-offs) ``post`` closures or ``call`` and wait for the result; the
loop runs them between steps (``run_pending``). A byte on a pipe wakes the loop at once
when it idles in ``zmq.Poller.poll`` (register ``fileno()``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


CALL_TIMEOUT_S = 5.0  # how long another thread waits for the loop to take its call


class LoopCallTimeout(TimeoutError):
    """The loop did not get to a call in time (it is stuck in a long step, or stopping)."""


class LoopCalls:
    def __init__(self) -> None:
        self._pending: collections.deque[Callable[[], None]] = collections.deque()
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def fileno(self) -> int:
        return self._read_fd

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop soon; do not wait."""
        self._pending.append(fn)  # deque appends and pops are thread-safe
        with contextlib.suppress(BlockingIOError):  # the pipe is full of wake-ups already
            os.write(self._write_fd, b"\0")

    def call(self, fn: Callable[[], T], timeout_s: float) -> T:
        """Run ``fn`` on the loop and return its result (or raise its exception).

        NOTE: a call that times out before the loop starts it is cancelled, so it never
        runs behind its caller's back (a Reserve that gave up must not allocate later).
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to the caller
                future.set_exception(e)

        self.post(run)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                message = f"the engine loop did not answer within {timeout_s} s"
                raise LoopCallTimeout(message) from None
            return future.result()  # started just now: it finishes soon

    def run_pending(self) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        while self._pending:
            self._pending.popleft()()

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)
