"""A real redis-server per test and small factories for records and ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.redis_server import EmbeddedRedis
from scheduler.registry import RankRegistration

# Short periods keep expiry tests quick; the logic does not depend on the value.
EXPIRE_PERIOD_MS = 500


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def config(redis_server: EmbeddedRedis) -> SchedulerConfig:
    return SchedulerConfig(
        name="splitwise", port=redis_server.port, topic="t", expire_period_ms=EXPIRE_PERIOD_MS
    )


def make_record(
    rank_id: str,
    role: str = "mixed",
    host: str = "host-a",
    protocols: tuple[str, ...] = ("rdma", "tcp"),
    num_blocks: int = 1000,
) -> pb.InstanceRecord:
    return pb.InstanceRecord(
        rank_id=rank_id,
        role=role,
        host=host,
        model="tiny",
        dp_size=1,
        tp_size=1,
        protocols=list(protocols),
        kv_layout=pb.KvLayout(
            num_layers=2, num_kv_heads=2, head_dim=16, block_size=16, num_blocks=num_blocks
        ),
    )


@pytest.fixture
def record() -> Callable[..., pb.InstanceRecord]:
    return make_record


@pytest.fixture
def register(config: SchedulerConfig) -> Iterator[Callable[..., RankRegistration]]:
    """``register(rank_id, **record_fields)``: a live registration, stopped after the test."""
    started: list[RankRegistration] = []

    def start(rank_id: str, **fields) -> RankRegistration:
        started.append(RankRegistration(config, make_record(rank_id, **fields)).start())
        return started[-1]

    yield start
    for registration in started:
        registration.stop()
