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
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from engine.output_processor import OutputProcessor
from engine.outputs import EngineCoreOutput, OutputKind, RequestOutput
from engine.sampling_params import SamplingParams
from pd.engine_messages import (
    AddRequest,
    EngineInfo,
    EngineStats,
    Kind,
    MalformedMessage,
    decode,
    encode,
    hello_token,
)  # fmt: skip

logger = logging.getLogger("pd.api")


class EngineDeadError(RuntimeError):
    pass


class RequestRejected(ValueError):
    """The engine refused the request (e.g. a prompt it cannot serve)."""


class EngineOverloaded(RuntimeError):
    """More requests are waiting for their first token than the server allows."""


class ClusterUnavailable(RuntimeError):
    """The cluster cannot take the request now (no live rank of a role, no scheduler)."""


class RequestFailed(RuntimeError):
    """The cluster ended the request with an error (e.g. the rank running it died)."""


def _log_send_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("sending to the engine failed: %s", future.exception())


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
    on_kv_events: Callable[[list], None] = lambda events: None
    on_workers: Callable[[list[bool]], None] = lambda alive: None


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
        self.channel_key: bytes | None = None  # proven in HELLO (pd/cluster_secret.py)
        # A stream that gets nothing for this long ends with RequestFailed (its request
        # vanished somewhere); None: a local engine, whose death fails every stream.
        self.idle_timeout_s: float | None = None
        self.last_stats_at: float | None = None  # monotonic time of the engine's last STATS
        self._reader: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------

    async def wait_ready(self, is_alive: Callable[[], bool], timeout: float) -> EngineInfo:
        """Say HELLO until the engine answers READY (it does once its model is loaded)."""
        token = None
        if self.channel_key is not None:
            identity = self.socket.getsockopt(zmq.IDENTITY)
            token = hello_token(self.channel_key, identity)
        await self.socket.send(encode(Kind.HELLO, token))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not is_alive():
                raise EngineDeadError("the engine process exited during start-up")
            if await self.socket.poll(200):
                try:
                    kind, payload = decode(await self.socket.recv())
                except MalformedMessage:
                    continue
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

    async def wait_dispatchable(self) -> None:
        """Return once a request could be placed (a cluster's ranks registered), or after
        a bound; a local engine always can."""

    @property
    def num_not_started(self) -> int:
        """Requests sent to the engine that have no token yet (queued or prefilling)."""
        return sum(1 for s in self.streams.values() if s.last_token_time is None)

    # -- requests -------------------------------------------------------------

    def open(
        self,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stream: bool,
        max_not_started: int | None = None,
    ) -> RequestStream:
        """Admit and submit a request; iterate the returned stream for its outputs
        (deltas when ``stream``, else one final output).

        NOTE: synchronous on purpose: the waiting bound is checked and the request
        registered with no await in between, so simultaneous arrivals cannot all
        pass the check. Closing the stream early aborts the request.
        """
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        if max_not_started is not None and self.num_not_started >= max_not_started:
            raise EngineOverloaded(f"server busy: {self.num_not_started} requests are waiting")
        request_id = uuid.uuid4().hex
        kind = OutputKind.DELTA if stream else OutputKind.FINAL_ONLY
        child_ids = self.processor.add_request(request_id, prompt, prompt_token_ids, params, kind)
        entry = _Stream(child_ids=child_ids, num_prompt_tokens=len(prompt_token_ids))
        self.streams[request_id] = entry
        for child_id in child_ids:
            self.child_to_parent[child_id] = request_id
        handle = RequestStream(self, request_id, entry)
        try:
            self._submit(child_ids, prompt_token_ids, params)
        except BaseException:
            handle.release(submitted=False)
            raise
        return handle

    def _submit(self, child_ids: list[str], prompt_token_ids: list[int], params: SamplingParams):
        """Send the children of a request to the engine (all or, raising, none)."""
        frames = [
            encode(Kind.ADD, AddRequest(child_id, prompt_token_ids, params.for_child(i)))
            for i, child_id in enumerate(child_ids)
        ]
        for frame in frames:
            self._send_nowait(frame)

    def _abort(self, child_ids: list[str]) -> None:
        self._send_nowait(encode(Kind.ABORT, child_ids))

    def _send_nowait(self, frame: bytes) -> None:
        # zmq.asyncio sends at once when it can and queues in order otherwise.
        future = self.socket.send(frame)
        future.add_done_callback(_log_send_failure)

    def _release(self, request_id: str, entry: _Stream, finished: bool, submitted: bool) -> None:
        self._forget(request_id)
        if finished:
            return
        reason = "abort" if self.dead_reason is None else "error"
        elapsed = time.monotonic() - entry.arrival
        self.timings.on_finished(reason, elapsed, entry.num_prompt_tokens, entry.num_generated)
        if submitted and self.dead_reason is None:
            self._abort(entry.child_ids)

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
            try:
                kind, payload = decode(await self.socket.recv())
            except MalformedMessage as error:
                logger.warning("dropped a malformed message from the engine: %s", error)
                continue
            if kind is Kind.OUTPUTS:
                self._on_outputs(payload)
            elif kind is Kind.STATS:
                self.stats = payload
                self.last_stats_at = time.monotonic()
                self.timings.on_kv_events(payload.kv_events)
                self.timings.on_workers(payload.tp_workers_alive)
                self.timings.on_stats(
                    payload.num_running,
                    payload.num_waiting,
                    payload.num_free_blocks,
                    payload.num_blocks,
                )
            elif kind is Kind.REJECTED:
                self._on_rejected(*payload)

    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            self._observe(output, now)
        processed = self.processor.process(outputs)
        if processed.to_abort:
            self._abort(processed.to_abort)
        for request_output in processed.request_outputs:
            entry = self.streams.get(request_output.request_id)
            if entry is None:
                continue
            if request_output.finished:
                # Counted per request, after stop strings: once, whatever n is.
                reason = request_output.outputs[-1].finish_reason or "stop"
                elapsed = now - entry.arrival
                self.timings.on_finished(
                    reason, elapsed, entry.num_prompt_tokens, entry.num_generated
                )
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

    def _on_rejected(self, child_id: str, message: str) -> None:
        self._fail(child_id, RequestRejected(message))

    def _fail(self, child_id: str, error: Exception) -> None:
        entry = self.streams.get(self.child_to_parent.get(child_id, ""))
        if entry is not None:
            entry.queue.put_nowait(error)


class RequestStream:
    """The outputs of one submitted request, as an async iterator.

    ``aclose()`` releases the request (aborting it in the engine unless it
    finished); a stream dropped without closing is released on the event loop
    when it is garbage-collected, so a response that never started cannot leak.
    """

    def __init__(self, client: EngineClient, request_id: str, entry: _Stream):
        self._client = client
        self._request_id = request_id
        self._entry = entry
        self._loop = asyncio.get_running_loop()
        self._finished = False
        self._released = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._released:
            raise StopAsyncIteration
        idle_timeout_s = self._client.idle_timeout_s
        if idle_timeout_s is None:
            item = await self._entry.queue.get()
        else:
            try:
                item = await asyncio.wait_for(self._entry.queue.get(), idle_timeout_s)
            except asyncio.TimeoutError:
                item = RequestFailed(f"no output for {idle_timeout_s:g} s: the request was lost")
        if isinstance(item, Exception):
            self.release()
            raise item
        if item.finished:
            self._finished = True
            self.release()
        return item

    async def aclose(self) -> None:
        self.release()

    def release(self, submitted: bool = True) -> None:
        if not self._released:
            self._released = True
            self._client._release(self._request_id, self._entry, self._finished, submitted)

    def __del__(self) -> None:
        if not self._released and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.release)
