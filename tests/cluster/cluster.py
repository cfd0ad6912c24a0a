"""Real local clusters for the tests: an embedded Redis and ``pd-serve`` instances in
their roles, each a real process pair (API server + engine) on real sockets."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import redis

from scheduler.keys import Keys
from scheduler.redis_server import EmbeddedRedis
from tests.pd.server_process import ServerProcess, start_server

EXPIRE_PERIOD_MS = 1000
_BLOCKS_WAIT_S = 15.0  # a dead prefill's reservations are released by their lease (10 s)


class Cluster:
    def __init__(self, redis_server: EmbeddedRedis, model_dir: Path, log_dir: Path, topic: str):
        self.redis = redis_server
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.topic = topic
        self.keys = Keys(topic)
        self.instances: list[ServerProcess] = []
        self.roles: dict[int, str] = {}  # API port -> role

    def start(self, role: str, *extra: str, model_dir: Path | None = None) -> ServerProcess:
        index = len(self.instances)
        server = start_server(
            model_dir or self.model_dir, self.log_dir / f"{index}-{role}.log",
            "--served-model-name", "tiny", "--splitwise-role", role,
            "--scheduler-name", "splitwise", "--scheduler-port", str(self.redis.port),
            "--scheduler-topic", self.topic,
            "--scheduler-expire-period", str(EXPIRE_PERIOD_MS), *extra,
        )  # fmt: skip
        self.instances.append(server)
        self.roles[server.port] = role
        return server

    def rank_id(self, server: ServerProcess) -> str:
        """As pd/cluster_instance.py names it."""
        return f"{self.roles[server.port]}-127.0.0.1-{server.port}.dp0"

    def redis_client(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port, password=self.redis.password)

    def kill(self, server: ServerProcess) -> None:
        """kill -9 the whole instance: its engine first, then its API server."""
        os.kill(server.engine_pid(), signal.SIGKILL)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()

    def live(self) -> list[ServerProcess]:
        return [s for s in self.instances if s.process.poll() is None]

    def stop(self) -> list[tuple[ServerProcess, int]]:
        return [(server, server.stop()) for server in self.live()]


def wait_both_ranks_took_work(servers: Iterable[ServerProcess], num_requests: int) -> None:
    """Each server's two DP ranks took ``num_requests`` between them, each some."""
    for server in servers:
        deadline = time.monotonic() + 5  # stats come every 100 ms
        while sum(taken := server.metric_samples("pd:dp_rank_requests_total")) < num_requests:
            assert time.monotonic() < deadline, taken
            time.sleep(0.1)
        assert len(taken) == 2 and min(taken) > 0, f"{server.root_url}: {taken}"


def wait_blocks_free(servers: Iterable[ServerProcess], timeout_s: float = _BLOCKS_WAIT_S) -> None:
    """Every server's KV blocks free again (none used, none reserved)."""
    deadline = time.monotonic() + timeout_s
    for server in servers:
        while True:
            usage = max(server.metric_samples("pd:kv_cache_usage_perc"))  # every DP rank
            if usage == 0.0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{server.root_url}: KV blocks still in use ({usage:.3f})")
            time.sleep(0.1)
