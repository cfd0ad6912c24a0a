"""One engine-core process (one DP rank) as the offline ``LLM`` sees it: a blocking ZMQ
DEALER speaking ``pd/engine_messages.py`` (the API server's is ``pd/engine_link.py``,
on asyncio). It says HELLO (proving the channel key) as soon as it connects; the
engine answers READY once its model is loaded."""

from __future__ import annotations

import logging
import uuid
from collections import deque
from typing import Any

import zmq

from pd.engine_messages import (
    EngineInfo,
    EngineStats,
    Kind,
    MalformedMessage,
    decode,
    encode,
    hello_token,
)  # fmt: skip

logger = logging.getLogger("pd.llm")


class RankLink:
    def __init__(self, context: zmq.Context, address: str, dp_rank: int, channel_key: bytes):
        self.address = address
        self.dp_rank = dp_rank
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        identity = f"llm-{uuid.uuid4().hex[:12]}-dp{dp_rank}".encode()
        self.socket.setsockopt(zmq.IDENTITY, identity)
        self.socket.connect(address)
        self.socket.send(encode(Kind.HELLO, hello_token(channel_key, identity)))
        self.info: EngineInfo | None = None  # from READY
        self.stats: EngineStats | None = None  # the last STATS
        # OUTPUTS and REJECTED in arrival order, until the caller takes them. NOTE: STATS
        # are kept as the last one only, so a link nobody reads for hours stays small.
        self.inbox: deque[tuple[Kind, Any]] = deque()
        self.num_malformed = 0

    def receive(self) -> None:
        """Take every message waiting now (never blocks) into ``info``, ``stats`` and
        ``inbox``; a frame that does not decode is dropped with a warning."""
        while True:
            try:
                frame = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                kind, payload = decode(frame)
            except MalformedMessage as error:
                self.num_malformed += 1
                logger.warning("DP rank %d: dropped a malformed message: %s", self.dp_rank, error)
                continue
            if kind is Kind.READY:
                self.info = payload
            elif kind is Kind.STATS:
                self.stats = payload
            elif kind in (Kind.OUTPUTS, Kind.REJECTED):
                self.inbox.append((kind, payload))

    def take(self) -> list[tuple[Kind, Any]]:
        """The OUTPUTS and REJECTED messages received so far, oldest first."""
        taken = list(self.inbox)
        self.inbox.clear()
        return taken

    def send(self, kind: Kind, payload: Any = None) -> None:
        self.socket.send(encode(kind, payload))

    def close(self) -> None:
        self.socket.close()
