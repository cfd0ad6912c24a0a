"""One engine-core process (one DP rank) as an API server sees it: a ZMQ DEALER that
says HELLO (proving the channel key), waits for READY, then sends requests and reads
outputs and stats; plus what the API server knows of the rank's load and health."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import zmq
import zmq.asyncio

from pd.engine_messages import (
    EngineInfo,
    EngineStats,
    Kind,
    MalformedMessage,
    decode,
    encode,
    hello_token,
)  # fmt: skip


class EngineDeadError(RuntimeError):
    pass


class EngineLink:
    def __init__(self, context: zmq.asyncio.Context, address: str, dp_rank: int):
        self.address = address
        self.dp_rank = dp_rank
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        identity = f"api-{uuid.uuid4().hex[:12]}-dp{dp_rank}"
        self.socket.setsockopt(zmq.IDENTITY, identity.encode())
        self.socket.connect(address)
        self.info: EngineInfo | None = None
        self.stats: EngineStats | None = None
        self.last_stats_at: float | None = None  # monotonic time of the last STATS
        self.dead_reason: str | None = None
        # Children of this API server's requests that this rank holds (admitted or queued):
        # exact between STATS, which arrive only every 100 ms.
        self.num_open = 0

    async def wait_ready(
        self, is_alive: Callable[[], bool], timeout: float, channel_key: bytes | None
    ) -> EngineInfo:
        """Say HELLO until the engine answers READY (it does once its model is loaded)."""
        token = None
        if channel_key is not None:
            token = hello_token(channel_key, self.socket.getsockopt(zmq.IDENTITY))
        await self.socket.send(encode(Kind.HELLO, token))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not is_alive():
                raise EngineDeadError(
                    f"the engine process of DP rank {self.dp_rank} exited during start-up"
                )
            if await self.socket.poll(200):
                try:
                    kind, payload = decode(await self.socket.recv())
                except MalformedMessage:
                    continue
                if kind is Kind.READY:
                    self.info = payload
                    return payload
        raise EngineDeadError(
            f"the engine of DP rank {self.dp_rank} was not ready within {timeout:.0f} s"
        )

    async def recv(self) -> tuple[Kind, object]:
        """The next message; raises MalformedMessage on a frame that does not decode."""
        kind, payload = decode(await self.socket.recv())
        if kind is Kind.STATS:
            self.stats = payload
            self.last_stats_at = time.monotonic()
        return kind, payload

    def send(self, frame: bytes) -> None:
        """Send without waiting: zmq.asyncio sends at once when it can and queues in order
        otherwise; a send that fails is logged."""
        future = self.socket.send(frame)
        future.add_done_callback(_log_send_failure)

    def silent_for(self, now: float) -> float:
        """Seconds since the last STATS (0 before the first)."""
        return 0.0 if self.last_stats_at is None else now - self.last_stats_at

    @property
    def kv_use(self) -> float:
        """The fraction of the rank's KV blocks in use, from its last STATS."""
        stats = self.stats
        if stats is None or stats.num_blocks <= 0:
            return 0.0
        return 1.0 - stats.num_free_blocks / stats.num_blocks

    def close(self) -> None:
        self.socket.close()


def _log_send_failure(future) -> None:  # type: ignore[no-untyped-def]
    if not future.cancelled() and future.exception() is not None:
        logging.getLogger("pd.api").error("sending to the engine failed: %s", future.exception())
