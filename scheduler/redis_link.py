"""A Redis connection that knows when Redis is gone: errors are logged once per outage
per process (and the recovery once), callers get ``SchedulerUnavailable``, and loops
back off with a bounded, growing pause instead of hammering a dead server."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scheduler.config import SchedulerConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

MIN_BACKOFF_S = 0.05
MAX_BACKOFF_S = 0.5


class SchedulerUnavailable(RuntimeError):
    """Redis cannot be reached (or answered with an error) right now."""


class _Outage:
    """Whether one Redis server is unreachable, shared by every link to it in a process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None
        self.num_failures = 0


_outages: dict[tuple[str, int, int], _Outage] = {}
_outages_lock = threading.Lock()


def _outage_of(config: SchedulerConfig) -> _Outage:
    with _outages_lock:
        return _outages.setdefault((config.host, config.port, config.db), _Outage())


class RedisLink:
    def __init__(self, config: SchedulerConfig, name: str, socket_timeout_s: float = 5.0):
        self.config = config
        self.name = name
        # NOTE: redis-py's own retries are off: every caller here already loops (heartbeats,
        # readers) or has its own deadline (dispatch), and hidden retries would stretch both.
        self.client = redis.Redis(
            host=config.host,
            port=config.port,
            db=config.db,
            password=config.password,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=min(socket_timeout_s, 2.0),
            retry=Retry(NoBackoff(), 0),
        )
        self._outage = _outage_of(config)
        self._num_failures = 0  # this link's, for its backoff

    @property
    def is_down(self) -> bool:
        return self._outage.since is not None

    def call(self, op: Callable[[redis.Redis], T]) -> T:
        """Run ``op(client)``; a connection or server error becomes ``SchedulerUnavailable``."""
        try:
            result = op(self.client)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
            self._failed(e)
            raise SchedulerUnavailable(
                f"Redis at {self.config.host}:{self.config.port} is unavailable: {e}"
            ) from e
        self._num_failures = 0
        if self._outage.since is not None:
            self._recovered()
        return result

    def server_id(self) -> str:
        """The server's run id: it changes when Redis restarts (and has lost its data)."""
        return self.call(lambda r: r.info("server")["run_id"])

    def backoff_s(self) -> float:
        """How long a loop should pause after a failure: doubles per failure, bounded."""
        return min(MIN_BACKOFF_S * 2 ** min(self._num_failures, 10), MAX_BACKOFF_S)

    def pause_after_failure(self, stop: threading.Event | None = None) -> None:
        if stop is None:
            time.sleep(self.backoff_s())
        else:
            stop.wait(self.backoff_s())

    def close(self) -> None:
        self.client.close()

    def _failed(self, error: Exception) -> None:
        self._num_failures += 1
        outage = self._outage
        with outage.lock:
            outage.num_failures += 1
            if outage.since is None:
                outage.since = time.monotonic()
                logger.warning(
                    "%s: Redis at %s:%d unavailable (%s); retrying quietly until it is back",
                    self.name,
                    self.config.host,
                    self.config.port,
                    error,
                )

    def _recovered(self) -> None:
        outage = self._outage
        with outage.lock:
            if outage.since is None:
                return
            logger.warning(
                "%s: Redis at %s:%d is back after %.1f s (%d failed calls)",
                self.name,
                self.config.host,
                self.config.port,
                time.monotonic() - outage.since,
                outage.num_failures,
            )
            outage.since = None
            outage.num_failures = 0
