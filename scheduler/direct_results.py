"""Results without Redis (``pd-router --splitwise``): a rank sends each step's
ResultBatch straight to the API server that owns the requests.

    rank: ResultPusher --ZMQ PUSH [mac, batch]--> API server: ResultListener (PULL)

- An owner is its listener's address, ``tcp://host:port`` (``DispatchedRequest.owner``);
  the listener binds the instance's ``--host`` on a free port.
- With a cluster secret every frame carries HMAC(key, batch), the key derived from the
  secret (``pd.cluster_secret.results_key``), and the listener drops a frame without
  the right one: nothing unauthenticated reaches a stream. Request ids are 128-bit
  random, so a batch names only its own requests.
- A rank names the requests it holds for an owner (``held_request_ids``) every beat,
  whether they produced tokens or not. The listener fails a request that nobody has
  named, nor sent tokens for, within ``silence_s``: its rank died or lost it. That is
  the bound Redis's reaper gives in the Redis path.
- The other way round, a rank whose connection to an owner has been down for as long
  (``ResultPusher.unreachable``) takes that owner for gone and stops its requests,
  which would otherwise hold their KV blocks until they end by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from proto import cluster_pb2 as pb
from scheduler.records import MalformedRecord, encode, parse
from scheduler.result_channel import Sink
from scheduler.result_order import ResultOrder

logger = logging.getLogger(__name__)

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
OWNER_ADDRESS = re.compile(
    rf"tcp://(?:\[[0-9A-Fa-f:.]{{2,45}}\]|{_LABEL}(?:\.{_LABEL})*):"
    r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)
_MAX_FRAME_BYTES = 64 << 20
_SEND_HWM = 100_000  # batches queued per owner before new ones are dropped (owner gone)
_IDLE_BEATS = 3  # an owner socket with nothing to send for this many beats is closed
_CLOSE_LINGER_MS = 1000  # a stopping rank's last batches still go out
_WATCH_S = 0.5

# (request id, why): a request nobody holds any more
OnLost = Callable[[str, str], None]


def check_owner(owner: str) -> str:
    if not OWNER_ADDRESS.fullmatch(owner):
        raise ValueError(f"owner must be a result address tcp://host:port, not {owner[:80]!r}")
    return owner


def _mac(key: bytes | None, payload: bytes) -> bytes:
    return b"" if key is None else hmac.new(key, payload, hashlib.sha256).digest()


class _OwnerLink:
    """A rank's socket to one owner, and whether it is connected (a monitor's word):
    ``down_since`` is when it last lost (or never had) a connection, None while up."""

    def __init__(self, context: zmq.Context, owner: str, beat_s: float):
        self.socket = context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, _SEND_HWM)
        # ZMTP pings: a host that vanished without closing its connections counts as
        # disconnected after a few beats, as one that closed them does at once.
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(beat_s * 1000)))
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(3 * beat_s * 1000)))
        self.monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.down_since: float | None = time.monotonic()
        self.idle_beats = 0
        self.socket.connect(owner)

    def poll(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_CONNECTED:
                self.down_since = None
            elif self.down_since is None:
                self.down_since = time.monotonic()

    def close(self, linger_ms: int = 0) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=linger_ms)


class ResultPusher:
    """A rank's side: collect a step's entries per owner, send each owner one batch
    (with the requests held for it, when a beat is due), and say which owners have
    been unreachable for long. Loop thread only."""

    def __init__(self, rank_id: str, key: bytes | None, beat_s: float):
        """``key``: the result frames' MAC key (None: the cluster has no secret)."""
        self.rank_id = rank_id
        self.beat_s = beat_s
        self._key = key
        self._context = zmq.Context()
        self._links: dict[str, _OwnerLink] = {}
        self._pending: dict[str, list[pb.ResultEntry]] = defaultdict(list)
        self._next_beat = 0.0
        self.num_dropped = 0

    def add(self, owner: str, entry: pb.ResultEntry) -> None:
        entry.rank_id = self.rank_id
        self._pending[owner].append(entry)

    def flush(self, held: Callable[[], dict[str, list[str]]]) -> None:
        """Send the pending entries; every ``beat_s`` also name the requests ``held()``
        returns per owner (owners with nothing pending included)."""
        now = time.monotonic()
        beat: dict[str, list[str]] = {}
        if now >= self._next_beat:
            beat = held()
            self._next_beat = now + self.beat_s
            self._close_idle(set(self._pending) | set(beat))
        for owner in set(self._pending) | set(beat):
            batch = pb.ResultBatch(
                entries=self._pending.get(owner, []), held_request_ids=beat.get(owner, [])
            )
            self._send(owner, encode(batch))
        self._pending.clear()

    def unreachable(self, for_s: float) -> list[str]:
        """Owners whose connection has been down (or never up) for ``for_s``: gone,
        since they fail their requests after as long a silence."""
        now = time.monotonic()
        gone = []
        for owner, link in self._links.items():
            link.poll()
            if link.down_since is not None and now - link.down_since >= for_s:
                gone.append(owner)
        return gone

    def _send(self, owner: str, payload: bytes) -> None:
        """Never raises: a batch an owner cannot take is dropped (its requests fail there
        by silence), so no owner address can stop the rank."""
        try:
            link = self._links.get(owner)
            if link is None:
                link = self._links[owner] = _OwnerLink(self._context, owner, self.beat_s)
            link.socket.send_multipart([_mac(self._key, payload), payload], zmq.NOBLOCK)
        except zmq.ZMQError as error:  # zmq.Again: its listener is gone or does not read
            self.num_dropped += 1
            if self.num_dropped <= 10 or self.num_dropped % 1000 == 0:
                logger.warning("%s: results for %s dropped (%d so far): %s", self.rank_id,
                               owner, self.num_dropped, error)  # fmt: skip

    def _close_idle(self, busy: set[str]) -> None:
        """Close the sockets of owners that had nothing for ``_IDLE_BEATS`` beats (an
        API server that restarted listens on a new port: its old address is dead)."""
        for owner, link in list(self._links.items()):
            link.idle_beats = 0 if owner in busy else link.idle_beats + 1
            if link.idle_beats >= _IDLE_BEATS:
                del self._links[owner]
                link.close()

    def close(self) -> None:
        for link in self._links.values():
            link.close(linger_ms=_CLOSE_LINGER_MS)
        self._links.clear()
        self._context.term()


class ResultListener:
    """An API server's side, on its event loop: entries reach ``sink`` in token order
    (as from Redis); a request silent for ``silence_s`` goes to ``on_lost``."""

    def __init__(
        self,
        bind_host: str,
        advertised_host: str,
        key: bytes | None,
        sink: Sink,
        on_lost: OnLost,
        silence_s: float,
    ):
        self.sink = sink
        self.on_lost = on_lost
        self.silence_s = silence_s
        self._key = key
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME_BYTES)
        port = self._socket.bind_to_random_port(f"tcp://{_bracketed(bind_host)}")
        self.address = f"tcp://{_bracketed(advertised_host)}:{port}"
        self._order = ResultOrder()
        self._last_heard: dict[str, float] = {}  # request id -> when a rank last named it
        self._holder: dict[str, str] = {}  # request id -> the rank that named it last
        self._tasks: list[asyncio.Task] = []
        self.num_malformed = 0
        self.num_unauthenticated = 0

    def start(self) -> ResultListener:
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]
        return self

    def expect(self, request_id: str) -> None:
        self._order.expect(request_id)
        self._last_heard[request_id] = time.monotonic()

    def forget(self, request_id: str) -> None:
        """Stop routing a request (aborted); its late entries are discarded."""
        self._order.forget(request_id)
        self._last_heard.pop(request_id, None)
        self._holder.pop(request_id, None)

    @property
    def num_expected(self) -> int:
        return len(self._order)

    async def _read(self) -> None:
        while True:
            frames = await self._socket.recv_multipart()
            try:
                batch = self._parse(frames)
            except MalformedRecord as error:
                self.num_malformed += 1
                if self.num_malformed <= 10 or self.num_malformed % 1000 == 0:
                    logger.warning("dropped a result frame (%d so far): %s",
                                   self.num_malformed, error)  # fmt: skip
                continue
            self._route(batch)

    def _parse(self, frames: list[bytes]) -> pb.ResultBatch:
        if len(frames) != 2:
            raise MalformedRecord(f"{len(frames)} frames, not [mac, batch]")
        mac, payload = frames
        if self._key is not None and not hmac.compare_digest(mac, _mac(self._key, payload)):
            self.num_unauthenticated += 1
            raise MalformedRecord("a batch without the cluster secret's MAC")
        return parse(pb.ResultBatch, payload)

    def _route(self, batch: pb.ResultBatch) -> None:
        now = time.monotonic()
        for request_id in batch.held_request_ids:
            if request_id in self._last_heard:
                self._last_heard[request_id] = now
        ready: dict[str, list[pb.ResultEntry]] = defaultdict(list)
        for entry in batch.entries:
            if entry.request_id in self._last_heard:
                self._last_heard[entry.request_id] = now
                self._holder[entry.request_id] = entry.rank_id
            ready[entry.request_id] += self._order.accept(entry)
        for request_id, entries in ready.items():
            if not self._order.is_expected(request_id):  # finished or failed: done here
                self._last_heard.pop(request_id, None)
                self._holder.pop(request_id, None)
            if entries:
                self._deliver(request_id, entries)

    def _deliver(self, request_id: str, entries: list[pb.ResultEntry]) -> None:
        """A sink that fails costs its request only, never the reader."""
        try:
            self.sink(request_id, entries)
        except Exception as error:
            logger.exception("delivering results of %s failed", request_id)
            self.forget(request_id)
            self._lost(request_id, f"results of {request_id} could not be delivered: {error}")

    def _lost(self, request_id: str, message: str) -> None:
        try:
            self.on_lost(request_id, message)
        except Exception:
            logger.exception("failing %s failed", request_id)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_WATCH_S)
            cutoff = time.monotonic() - self.silence_s
            for request_id, heard in list(self._last_heard.items()):
                if heard < cutoff:
                    holder = self._holder.get(request_id) or "its rank"
                    self.forget(request_id)
                    self._lost(request_id, f"{holder} stopped answering for request "
                               f"{request_id} ({self.silence_s:g} s of silence)")  # fmt: skip

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._socket.close()
        self._context.term()


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
