"""Fixtures of the cluster tests: one embedded Redis per module, a tiny model, clusters
on their own topics (stopped, and checked for a clean exit, at teardown)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scheduler.redis_server import EmbeddedRedis
from tests.cluster.cluster import Cluster


@pytest.fixture(scope="module")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model("qwen2")


@pytest.fixture
def make_cluster(
    redis_server: EmbeddedRedis, model_dir: Path, tmp_path: Path
) -> Iterator[Callable[[], Cluster]]:
    clusters: list[Cluster] = []

    def make() -> Cluster:
        cluster = Cluster(redis_server, model_dir, tmp_path, f"t{uuid.uuid4().hex[:8]}")
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        for server, code in cluster.stop():
            assert code == 0, server.log()[-4000:]
            assert "Traceback" not in server.log(), server.log()[-4000:]
