"""A Redis connection that knows when Redis is gone: errors are logged once per outage
(and the recovery once), callers get ``SchedulerUnavailable``, and loops back off
with a bounded, growing pause instead of hammering a dead server."""

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
        self._lock = threading.Lock()
        self._outage_since: float | None = None
        self._num_failures = 0

    @property
    def is_down(self) -> bool:
        return self._outage_since is not None

    def call(self, op: Callable[[redis.Redis], T]) -> T:
        """Run ``op(client)``; a connection or server error becomes ``SchedulerUnavailable``."""
        try:
            result = op(self.client)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as e:
            self._failed(e)
            raise SchedulerUnavailable(
                f"Redis at {self.config.host}:{self.config.port} is unavailable: {e}"
            ) from e
        if self._outage_since is not None:
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
        with self._lock:
            self._num_failures += 1
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                logger.warning(
                    "%s: Redis at %s:%d unavailable (%s); retrying quietly until it is back",
                    self.name,
                    self.config.host,
                    self.config.port,
                    error,
                )

    def _recovered(self) -> None:
        with self._lock:
            if self._outage_since is None:
                return
            logger.warning(
                "%s: Redis at %s:%d is back after %.1f s (%d failed calls)",
                self.name,
                self.config.host,
                self.config.port,
                time.monotonic() - self._outage_since,
                self._num_failures,
            )
            self._outage_since = None
            self._num_failures = 0
