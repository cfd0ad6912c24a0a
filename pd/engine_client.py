"""The API server's handle on its engine-core process.

Sends requests over a ZMQ DEALER, receives per-step output diffs, turns them
into ``RequestOutput``s with the output processor (detokenizing and applying
stop strings here, off the engine's loop), and hands each request's outputs
to its own asyncio queue. A request whose consumer goes away (client
disconnect) is aborted in the engine. If the engine process dies, every
waiting request fails at once with ``EngineDeadError``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from engine.output_processor import OutputProcessor
from engine.outputs import EngineCoreOutput, OutputKind, RequestOutput
from engine.sampling_params import SamplingParams
from pd.engine_messages import AddRequest, EngineInfo, EngineStats, Kind, decode, encode

logger = logging.getLogger("pd.api")


class EngineDeadError(RuntimeError):
    pass


class RequestRejected(ValueError):
    """The engine refused the request (e.g. a prompt it cannot serve)."""


@dataclass
class _Stream:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    child_ids: list[str] = field(default_factory=list)
    num_prompt_tokens: int = 0
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    num_generated: int = 0


@dataclass
class RequestTimings:
    """Hooks the server uses for metrics; all times are seconds."""

    on_first_token: Callable[[float], None] = lambda seconds: None
    on_inter_token: Callable[[float], None] = lambda seconds: None
    on_finished: Callable[[str, float, int, int], None] = lambda *args: None
    on_stats: Callable[[int, int, int, int], None] = lambda *args: None


class EngineClient:
    def __init__(self, address: str, tokenizer, timings: RequestTimings | None = None):
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IDENTITY, f"api-{uuid.uuid4().hex[:12]}".encode())
        self.socket.connect(address)
        self.processor = OutputProcessor(tokenizer)
        self.timings = timings or RequestTimings()
        self.streams: dict[str, _Stream] = {}
        self.child_to_parent: dict[str, str] = {}
        self.info: EngineInfo | None = None
        self.stats: EngineStats | None = None
        self.dead_reason: str | None = None
        self._reader: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------

    async def wait_ready(self, is_alive: Callable[[], bool], timeout: float) -> EngineInfo:
        """Say HELLO until the engine answers READY (it does once its model is loaded)."""
        await self.socket.send(encode(Kind.HELLO))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not is_alive():
                raise EngineDeadError("the engine process exited during start-up")
            if await self.socket.poll(200):
                kind, payload = decode(await self.socket.recv())
                if kind is Kind.READY:
                    self.info = payload
                    self._reader = asyncio.create_task(self._read_loop())
                    return payload
        raise EngineDeadError(f"the engine was not ready within {timeout:.0f} s")

    def mark_dead(self, reason: str) -> None:
        """Fail every in-flight request; later requests fail at once."""
        if self.dead_reason is None:
            logger.error("engine dead: %s", reason)
            self.dead_reason = reason
        for stream in self.streams.values():
            stream.queue.put_nowait(EngineDeadError(reason))

    async def shutdown(self) -> None:
        if self.dead_reason is None:
            await self.socket.send(encode(Kind.SHUTDOWN))
        if self._reader is not None:
            self._reader.cancel()
        self.socket.close()
        self.context.term()

    @property
    def num_unfinished(self) -> int:
        return len(self.streams)

    @property
    def num_not_started(self) -> int:
        """Requests sent to the engine that have no token yet (queued or prefilling)."""
        return sum(1 for s in self.streams.values() if s.last_token_time is None)

    # -- requests -------------------------------------------------------------

    async def generate(
        self,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stream: bool,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs: deltas when ``stream``, else one final output.

        Leaving the iteration early (the client went away) aborts the request."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        request_id = request_id or uuid.uuid4().hex
        kind = OutputKind.DELTA if stream else OutputKind.FINAL_ONLY
        child_ids = self.processor.add_request(request_id, prompt, prompt_token_ids, params, kind)
        entry = _Stream(child_ids=child_ids, num_prompt_tokens=len(prompt_token_ids))
        finished = False
        try:
            # NOTE: registered inside the try, so that whatever fails below (even
            # encoding) still releases the request.
            self.streams[request_id] = entry
            for index, child_id in enumerate(child_ids):
                self.child_to_parent[child_id] = request_id
                add = AddRequest(child_id, prompt_token_ids, params.for_child(index))
                await self.socket.send(encode(Kind.ADD, add))
            while True:
                item = await entry.queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._forget(request_id)
            if not finished:
                reason = "abort" if self.dead_reason is None else "error"
                elapsed = time.monotonic() - entry.arrival
                self.timings.on_finished(
                    reason, elapsed, entry.num_prompt_tokens, entry.num_generated
                )
                if self.dead_reason is None:
                    await self._abort(child_ids)

    async def _abort(self, child_ids: list[str]) -> None:
        await self.socket.send(encode(Kind.ABORT, child_ids))

    def _forget(self, request_id: str) -> None:
        entry = self.streams.pop(request_id, None)
        if entry is None:
            return
        self.processor.abort(request_id)
        for child_id in entry.child_ids:
            self.child_to_parent.pop(child_id, None)

    # -- engine output --------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            kind, payload = decode(await self.socket.recv())
            if kind is Kind.OUTPUTS:
                await self._on_outputs(payload)
            elif kind is Kind.STATS:
                self.stats = payload
                self.timings.on_stats(
                    payload.num_running,
                    payload.num_waiting,
                    payload.num_free_blocks,
                    payload.num_blocks,
                )
            elif kind is Kind.REJECTED:
                self._on_rejected(*payload)

    async def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            self._observe(output, now)
        processed = self.processor.process(outputs)
        if processed.to_abort:
            await self._abort(processed.to_abort)
        for request_output in processed.request_outputs:
            entry = self.streams.get(request_output.request_id)
            if entry is not None:
                entry.queue.put_nowait(request_output)

    def _observe(self, output: EngineCoreOutput, now: float) -> None:
        entry = self.streams.get(self.child_to_parent.get(output.request_id, ""))
        if entry is None:
            return
        if output.new_token_ids:
            if entry.last_token_time is None:
                self.timings.on_first_token(now - entry.arrival)
            else:
                self.timings.on_inter_token(now - entry.last_token_time)
            entry.last_token_time = now
            entry.num_generated += len(output.new_token_ids)
        if output.finished:
            self.timings.on_finished(
                output.finish_reason or "stop",
                now - entry.arrival,
                entry.num_prompt_tokens,
                entry.num_generated,
            )

    def _on_rejected(self, child_id: str, message: str) -> None:
        entry = self.streams.get(self.child_to_parent.get(child_id, ""))
        if entry is not None:
            entry.queue.put_nowait(RequestRejected(message))
