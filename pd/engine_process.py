"""The engine-core process of one DP rank: a ZMQ ROUTER around ``EngineCore``.

It binds the engine-worker-queue port first (so API servers can connect while
the model loads), answers HELLO with READY once the model is loaded, then
loops: take every queued message, run one engine step when there is work,
send each client the outputs of its requests, and report load.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import zmq

from pd.engine_messages import AddRequest, EngineInfo, EngineStats, Kind, decode, encode

logger = logging.getLogger("pd.engine")

_IDLE_POLL_MS = 50
_STATS_INTERVAL_S = 0.1


def run_engine_process(engine_kwargs: dict[str, Any], address: str, log_level: str) -> None:
    """Entry point of the child process (spawned; everything heavy imports here)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s engine %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server decides when we stop
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(address)
    try:
        from engine.config import make_engine_config
        from engine.engine_core import EngineCore

        engine = EngineCore(make_engine_config(**engine_kwargs))
        logger.info("model loaded; serving on %s", address)
        EngineLoop(engine, socket).run()
    finally:
        socket.close()
        context.term()


class EngineLoop:
    def __init__(self, engine, socket: zmq.Socket):
        self.engine = engine
        self.socket = socket
        self.owner: dict[str, bytes] = {}  # request id -> client identity
        self.clients: set[bytes] = set()
        self.running = True
        self._last_stats = 0.0
        config = engine.config
        self.info = EngineInfo(
            max_model_len=config.scheduler.max_model_len,
            num_blocks=engine.block_manager.num_blocks,
            block_size=config.cache.block_size,
            vocab_size=config.model.vocab_size,
        )

    def run(self) -> None:
        while self.running:
            busy = self.engine.has_unfinished()
            if self.socket.poll(0 if busy else _IDLE_POLL_MS):
                self._drain_messages()
            if self.engine.has_unfinished():
                self._send_outputs(self.engine.step())
            self._maybe_send_stats()

    def _drain_messages(self) -> None:
        while self.running:
            try:
                identity, frame = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, payload = decode(frame)
            self._handle(identity, kind, payload)

    def _handle(self, identity: bytes, kind: Kind, payload: Any) -> None:
        if kind is Kind.HELLO:
            self.clients.add(identity)
            self._send(identity, Kind.READY, self.info)
        elif kind is Kind.ADD:
            self._add(identity, payload)
        elif kind is Kind.ABORT:
            self._send_outputs(self.engine.abort_requests(payload))
        elif kind is Kind.SHUTDOWN:
            logger.info("shutdown requested")
            self.running = False

    def _add(self, identity: bytes, request: AddRequest) -> None:
        try:
            self.engine.add_request(request.request_id, request.prompt_token_ids, request.params)
        except ValueError as error:
            self._send(identity, Kind.REJECTED, [request.request_id, str(error)])
            return
        self.owner[request.request_id] = identity

    def _send_outputs(self, outputs: list) -> None:
        by_client: dict[bytes, list] = {}
        for output in outputs:
            identity = self.owner.get(output.request_id)
            if identity is None:
                continue
            by_client.setdefault(identity, []).append(output)
            if output.finished:
                del self.owner[output.request_id]
        for identity, batch in by_client.items():
            self._send(identity, Kind.OUTPUTS, batch)

    def _maybe_send_stats(self) -> None:
        now = time.monotonic()
        if now - self._last_stats < _STATS_INTERVAL_S:
            return
        self._last_stats = now
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        stats = EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_free_blocks=blocks.num_free_blocks,
            num_blocks=blocks.num_blocks,
        )
        for identity in self.clients:
            self._send(identity, Kind.STATS, stats)

    def _send(self, identity: bytes, kind: Kind, payload: Any) -> None:
        self.socket.send_multipart([identity, encode(kind, payload)])
