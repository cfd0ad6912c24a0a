"""The API server's handle on its engine-core processes (one per local DP rank).

Sends requests over ZMQ (``pd/engine_link.py``), receives per-step output diffs,
turns them into ``RequestOutput``s with the output processor (detokenizing and
applying stop strings here, off the engines' loops), and hands each request's
outputs to its own asyncio queue. A request whose consumer goes away (client
disconnect) is aborted in its engine.

With several DP ranks each request goes to the least loaded live rank (its
requests open here plus its KV use, random among near-equals), all its choices
(``n``) together so they share the prompt's KV. When a rank's engine process dies,
its requests fail at once with ``EngineDeadError`` and new ones go to the others;
when every rank is dead, every request fails.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from engine.output_processor import OutputProcessor
from engine.outputs import EngineCoreOutput, OutputKind, RequestOutput
from engine.sampling_params import SamplingParams
from pd.engine_link import EngineDeadError, EngineLink
from pd.engine_messages import AddRequest, EngineInfo, Kind, MalformedMessage, encode

logger = logging.getLogger("pd.api")

__all__ = ["EngineClient", "EngineDeadError", "RequestStream", "RequestTimings"]

# A rank silent this long (no STATS; they come every 100 ms between steps) takes no new
# request while another can. NOTE: above the longest CPU step (see HEALTH_STALE_S).
STALE_RANK_S = 5.0
# Ranks whose load is within this of the least loaded one are equally good (a request
# or two): picking at random among them spreads simultaneous arrivals.
NEAR_EQUAL_LOAD = 1.0


class RequestRejected(ValueError):
    """The engine refused the request (e.g. a prompt it cannot serve)."""


class EngineOverloaded(RuntimeError):
    """More requests are waiting for their first token than the server allows."""


class ClusterUnavailable(RuntimeError):
    """The cluster cannot take the request now (no live rank of a role, no scheduler)."""


class RequestFailed(RuntimeError):
    """The cluster ended the request with an error (e.g. the rank running it died)."""


class RouteRefused(ValueError):
    """What a request says about its route (e.g. a router's pairing) is refused."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class RequestEntry:
    link: EngineLink | None  # the DP rank running it; None: placed by the cluster
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
    # (dp_rank, running, waiting, free blocks, blocks)
    on_stats: Callable[[int, int, int, int, int], None] = lambda *args: None
    on_kv_events: Callable[[list], None] = lambda events: None
    on_workers: Callable[[int, list[bool]], None] = lambda dp_rank, alive: None
    # (dp_rank, requests taken, dummy steps, tokens per expert), each since the engine
    # started
    on_engine_totals: Callable[[int, int, int, list[int]], None] = lambda *args: None
    on_rank_up: Callable[[int, bool], None] = lambda dp_rank, up: None
    # (prompt tokens, of those served from the prefix cache), per finished request
    on_prefix_cache: Callable[[int, int], None] = lambda prompt, cached: None


class EngineClient:
    def __init__(
        self,
        addresses: Sequence[str],
        tokenizer,  # type: ignore[no-untyped-def]
        timings: RequestTimings | None = None,
        dp_ranks: Sequence[int] | None = None,
    ):
        """``addresses``: the engine channel of each local DP rank; ``dp_ranks``: their
        global DP ranks (default 0, 1, ...)."""
        self.context = zmq.asyncio.Context()
        dp_ranks = list(dp_ranks) if dp_ranks is not None else list(range(len(addresses)))
        self.links = [
            EngineLink(self.context, address, rank)
            for address, rank in zip(addresses, dp_ranks, strict=True)
        ]
        self.processor = OutputProcessor(tokenizer)
        self.timings = timings or RequestTimings()
        self.streams: dict[str, RequestEntry] = {}
        self.child_to_parent: dict[str, str] = {}
        self.info: EngineInfo | None = None
        self.dead_reason: str | None = None  # set once every DP rank is dead
        self.channel_key: bytes | None = None  # proven in HELLO (pd/cluster_secret.py)
        # A stream that gets nothing for this long ends with RequestFailed (its request
        # vanished somewhere); None: local engines, whose death fails their streams.
        self.idle_timeout_s: float | None = None
        self._readers: list[asyncio.Task] = []
        self._rng = random.Random()

    # -- lifecycle ------------------------------------------------------------

    async def wait_ready(
        self, is_alive: Sequence[Callable[[], bool]], timeout: float
    ) -> EngineInfo:
        """Wait until every DP rank's engine is ready (``is_alive[i]``: whether rank i's
        process still runs); returns DP rank 0's info (the DP group checked the others
        serve the same model)."""
        infos = await asyncio.gather(
            *(link.wait_ready(alive, timeout, self.channel_key)
              for link, alive in zip(self.links, is_alive, strict=True))
        )  # fmt: skip
        self.info = infos[0]
        for link in self.links:
            self.timings.on_rank_up(link.dp_rank, True)
            self._readers.append(asyncio.create_task(self._read_loop(link)))
        return self.info

    def mark_dead(self, reason: str) -> None:
        """Fail every in-flight request; later requests fail at once."""
        for link in self.links:
            self.mark_rank_dead(link, reason)

    def mark_rank_dead(self, link: EngineLink, reason: str) -> None:
        """DP rank ``link`` is gone: fail its requests; with no rank left, fail all."""
        if link.dead_reason is None:
            logger.error("DP rank %d: engine dead: %s", link.dp_rank, reason)
            link.dead_reason = reason
            self.timings.on_rank_up(link.dp_rank, False)
        everyone_dead = all(other.dead_reason is not None for other in self.links)
        if everyone_dead and self.dead_reason is None:
            self.dead_reason = reason if len(self.links) == 1 else (
                f"every DP rank's engine is dead (DP rank {link.dp_rank}: {reason})"
            )  # fmt: skip
        for stream in self.streams.values():
            if stream.link is link or self.dead_reason is not None:
                stream.queue.put_nowait(EngineDeadError(reason))

    async def shutdown(self) -> None:
        for link in self.links:
            if link.dead_reason is None:
                await link.socket.send(encode(Kind.SHUTDOWN))
        for reader in self._readers:
            reader.cancel()
        for link in self.links:
            link.close()
        self.context.term()

    async def wait_dispatchable(self) -> None:
        """Return once a request could be placed (a cluster's ranks registered), or after
        a bound; local engines always can."""

    def route_for(self, headers: Mapping[str, str]) -> object | None:
        """What the request's HTTP headers say about where it runs (a router's pairing),
        checked; RouteRefused when they are not acceptable. Local engines need nothing."""
        return None

    @property
    def last_stats_at(self) -> float | None:
        """When the freshest live rank last reported (None before any did)."""
        times = [link.last_stats_at for link in self.live_links if link.last_stats_at]
        return max(times) if times else None

    @property
    def live_links(self) -> list[EngineLink]:
        return [link for link in self.links if link.dead_reason is None]

    @property
    def num_not_started(self) -> int:
        """Requests sent to the engine that have no token yet (queued or prefilling)."""
        return sum(1 for s in self.streams.values() if s.last_token_time is None)

    def pick_link(self) -> EngineLink:
        """The DP rank for a new request: the least loaded live, reporting rank (its
        requests open here plus its KV use), at random among near-equals."""
        live = self.live_links
        if not live:
            raise EngineDeadError(self.dead_reason or "no engine is running")
        now = time.monotonic()
        reporting = [link for link in live if link.silent_for(now) < STALE_RANK_S] or live
        loads = [link.num_open + link.kv_use for link in reporting]
        least = min(loads)
        near = [
            link
            for link, load in zip(reporting, loads, strict=True)
            if load < least + NEAR_EQUAL_LOAD
        ]
        return near[0] if len(near) == 1 else self._rng.choice(near)

    # -- requests -------------------------------------------------------------

    def open(
        self,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stream: bool,
        max_not_started: int | None = None,
        route: object | None = None,
    ) -> RequestStream:
        """Admit and submit a request; iterate the returned stream for its outputs
        (deltas when ``stream``, else one final output); ``route``: from ``route_for``.

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
        link = self._place()
        entry = RequestEntry(link, child_ids=child_ids, num_prompt_tokens=len(prompt_token_ids))
        self.streams[request_id] = entry
        if link is not None:
            link.num_open += len(child_ids)
        for child_id in child_ids:
            self.child_to_parent[child_id] = request_id
        handle = RequestStream(self, request_id, entry)
        try:
            self._submit(entry, prompt_token_ids, params, route)
        except BaseException:
            handle.release(submitted=False)
            raise
        return handle

    def _place(self) -> EngineLink | None:
        """The DP rank a new request runs on."""
        return self.pick_link()

    def _submit(
        self,
        entry: RequestEntry,
        prompt_token_ids: list[int],
        params: SamplingParams,
        route: object | None,
    ) -> None:
        """Send the children of a request to its rank (all or, raising, none)."""
        assert entry.link is not None
        frames = [
            encode(Kind.ADD, AddRequest(child_id, prompt_token_ids, params.for_child(i)))
            for i, child_id in enumerate(entry.child_ids)
        ]
        for frame in frames:
            entry.link.send(frame)

    def _abort(self, child_ids: list[str], link: EngineLink | None) -> None:
        if link is not None and link.dead_reason is None:
            link.send(encode(Kind.ABORT, child_ids))

    def _release(
        self, request_id: str, entry: RequestEntry, finished: bool, submitted: bool
    ) -> None:
        self._forget(request_id)
        if finished:
            return
        # Its rank died (or every rank did): an error, not a client's abort.
        rank_dead = entry.link is not None and entry.link.dead_reason is not None
        failed = rank_dead or self.dead_reason is not None
        elapsed = time.monotonic() - entry.arrival
        self.timings.on_finished(
            "error" if failed else "abort", elapsed, entry.num_prompt_tokens,
            entry.num_generated,
        )  # fmt: skip
        if submitted and not failed:
            self._abort(entry.child_ids, entry.link)

    def _forget(self, request_id: str) -> None:
        entry = self.streams.pop(request_id, None)
        if entry is None:
            return
        self.processor.abort(request_id)
        if entry.link is not None:
            entry.link.num_open -= len(entry.child_ids)
        for child_id in entry.child_ids:
            self.child_to_parent.pop(child_id, None)

    # -- engine output --------------------------------------------------------

    async def _read_loop(self, link: EngineLink) -> None:
        while True:
            try:
                kind, payload = await link.recv()
            except MalformedMessage as error:
                logger.warning("dropped a malformed message from the engine: %s", error)
                continue
            if kind is Kind.OUTPUTS:
                self._on_outputs(payload, link)
            elif kind is Kind.STATS and link.dead_reason is None:
                self.timings.on_kv_events(payload.kv_events)
                self.timings.on_workers(link.dp_rank, payload.tp_workers_alive)
                self.timings.on_engine_totals(
                    link.dp_rank, payload.num_requests_taken, payload.num_dummy_steps,
                    payload.expert_tokens,
                )  # fmt: skip
                self.timings.on_stats(
                    link.dp_rank,
                    payload.num_running,
                    payload.num_waiting,
                    payload.num_free_blocks,
                    payload.num_blocks,
                )
            elif kind is Kind.REJECTED:
                self._on_rejected(*payload)

    def _on_outputs(self, outputs: list[EngineCoreOutput], link: EngineLink | None) -> None:
        now = time.monotonic()
        for output in outputs:
            self._observe(output, now)
        processed = self.processor.process(outputs)
        if processed.to_abort:
            self._abort(processed.to_abort, link)
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
                self.timings.on_prefix_cache(
                    entry.num_prompt_tokens, request_output.num_cached_tokens
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

    def _on_cluster_results(self, entries: list) -> None:
        """Results of ranks elsewhere in the cluster (``pd.cluster.ResultEntry``s, in
        order): an error fails its request, the rest are outputs."""
        from pd.cluster_wire import entry_to_output  # imports torch: cluster servers only

        outputs = []
        for entry in entries:
            if entry.finish_reason == "error":
                self._fail(entry.request_id, RequestFailed(entry.error))
            else:
                outputs.append(entry_to_output(entry))
        if outputs:
            self._on_outputs(outputs, None)

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

    def __init__(self, client: EngineClient, request_id: str, entry: RequestEntry):
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
