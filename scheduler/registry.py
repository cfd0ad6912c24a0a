"""The instance registry: each live DP rank keeps ``T:inst:<role>:<rank id>`` alive with its
load; dispatchers read a cached snapshot of all of them.

Liveness is Redis's TTL (PX = the expire period), never wall clocks compared across
hosts: a rank that stops refreshing its key is gone one expire period later.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import redis

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.dispatch_policy import ROLES, RankLoad
from scheduler.keys import Keys
from scheduler.records import MalformedRecord, encode, parse
from scheduler.redis_link import RedisLink, SchedulerUnavailable

logger = logging.getLogger(__name__)

SCAN_BATCH = 1000


def parse_record(raw: bytes) -> pb.InstanceRecord:
    record = parse(pb.InstanceRecord, raw)
    if record.role not in ROLES or not record.rank_id:
        raise MalformedRecord(f"role {record.role!r} / rank id {record.rank_id!r} is invalid")
    if record.kv_layout.block_size == 0:
        raise MalformedRecord("kv_layout.block_size is 0")
    return record


def rank_view(record: pb.InstanceRecord) -> RankLoad:
    """The dispatch policy's view of a record."""
    return RankLoad(
        rank_id=record.rank_id,
        role=record.role,
        host=record.host,
        protocols=tuple(record.protocols),
        num_running=record.load.num_running,
        num_waiting=record.load.num_waiting,
        num_queued_prompt_tokens=record.load.num_queued_prompt_tokens,
        num_free_blocks=record.load.num_free_blocks,
        num_blocks=max(record.kv_layout.num_blocks, 1),
        block_size=record.kv_layout.block_size,
    )


class RankRegistration:
    """Keeps one rank's record alive. The engine loop only calls ``update_load`` (a
    reference swap, never I/O); a daemon thread writes the record ``heartbeat_interval_s``
    apart, so a Redis restart is repaired by the next write without restarting ranks."""

    def __init__(
        self,
        config: SchedulerConfig,
        record: pb.InstanceRecord,
        on_redis_restart: Callable[[], None] | None = None,
    ):
        parse_record(encode(record))  # refuse to publish what readers would skip
        self.config = config
        self.key = Keys(config.topic).instance(record.role, record.rank_id)
        self._record = record
        self._load = pb.RankLoad()
        self._link = RedisLink(config, f"registry[{record.rank_id}]")
        self._on_redis_restart = on_redis_restart
        self._server_id: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"registry-{record.rank_id}", daemon=True
        )

    @property
    def rank_id(self) -> str:
        return self._record.rank_id

    def update_load(
        self,
        num_running: int,
        num_waiting: int,
        num_queued_prompt_tokens: int,
        num_free_blocks: int,
    ) -> None:
        self._load = pb.RankLoad(
            num_running=num_running,
            num_waiting=num_waiting,
            num_queued_prompt_tokens=num_queued_prompt_tokens,
            num_free_blocks=num_free_blocks,
        )

    def start(self) -> RankRegistration:
        self._write()  # registered before start() returns, when Redis is up
        self._thread.start()
        return self

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if deregister:
            with contextlib.suppress(SchedulerUnavailable):  # else the key expires on its own
                self._link.call(lambda r: r.delete(self.key))
        self._link.close()

    def _write(self) -> bool:
        self._record.load.CopyFrom(self._load)
        value = encode(self._record)

        def write(r: redis.Redis) -> str:
            pipe = r.pipeline(transaction=False)
            pipe.set(self.key, value, px=self.config.expire_period_ms)
            pipe.info("server")
            return pipe.execute()[1]["run_id"]

        try:
            server_id = self._link.call(write)
        except SchedulerUnavailable:
            return False
        if self._server_id not in (None, server_id) and self._on_redis_restart is not None:
            logger.warning("%s: Redis restarted; restoring what it lost", self.rank_id)
            try:
                self._on_redis_restart()
            except SchedulerUnavailable:
                return False  # the server id is not updated: the next write tries again
        self._server_id = server_id
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.config.heartbeat_interval_s):
            while not self._write() and not self._stop.is_set():
                self._link.pause_after_failure(self._stop)


class RegistryReader:
    """Snapshots of the live ranks, cached for ``max_age_s`` so that dispatching a request
    costs no Redis round trip; a refresh is one SCAN page plus one MGET for up to
    ``SCAN_BATCH`` ranks. Malformed records are skipped with one warning per key."""

    def __init__(self, config: SchedulerConfig, max_age_s: float = 0.1, name: str = "registry"):
        self.config = config
        self.keys = Keys(config.topic)
        self.max_age_s = max_age_s
        self._link = RedisLink(config, name)
        self._lock = threading.Lock()
        self._records: dict[str, pb.InstanceRecord] = {}
        self._ranks: list[RankLoad] = []
        self._read_at = -float("inf")
        self._warned: dict[str, str] = {}
        self.num_refreshes = 0

    def snapshot(self, max_age_s: float | None = None) -> list[RankLoad]:
        """Live ranks at most ``max_age_s`` old. When Redis is down, the last snapshot is
        served while it is younger than an expire period; after that, SchedulerUnavailable."""
        max_age_s = self.max_age_s if max_age_s is None else max_age_s
        with self._lock:
            if time.monotonic() - self._read_at > max_age_s:
                try:
                    self._refresh()
                except SchedulerUnavailable:
                    if time.monotonic() - self._read_at > self.config.expire_period_s:
                        raise
            return self._ranks

    def record(self, rank_id: str) -> pb.InstanceRecord | None:
        """The full record (ports, endpoints, KV layout) of a rank in the last snapshot."""
        return self._records.get(rank_id)

    def close(self) -> None:
        self._link.close()

    def _refresh(self) -> None:
        keys = self._scan_keys()
        values = self._link.call(lambda r: r.mget(keys)) if keys else []
        records: dict[str, pb.InstanceRecord] = {}
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue  # expired between SCAN and MGET
            try:
                record = parse_record(raw)
            except MalformedRecord as e:
                self._warn_once(key, str(e))
                continue
            self._warned.pop(key, None)
            records[record.rank_id] = record
        self._records = records
        self._ranks = [rank_view(r) for r in records.values()]
        self._read_at = time.monotonic()
        self.num_refreshes += 1

    def _scan_keys(self) -> list[bytes]:
        keys: list[bytes] = []
        cursor = 0
        while True:
            cursor, page = self._link.call(
                lambda r, c=cursor: r.scan(c, match=self.keys.instance_pattern, count=SCAN_BATCH)
            )
            keys.extend(page)
            if cursor == 0:
                return keys

    def _warn_once(self, key: bytes, reason: str) -> None:
        name = key.decode(errors="replace")
        if self._warned.get(name) != reason:
            self._warned[name] = reason
            logger.warning("registry: skipping %s: %s", name, reason)
