"""Registration of a multi-API-server instance (``--ports``: one API server per DP rank)
with a router that requires the cluster secret, the cache_aware policy over its two
servers, and their last beat when they stop (real processes, the official openai
client)."""

from __future__ import annotations

import os

import openai
import pytest

from pd.args import pick_free_port
from tests.pd.router.router_process import (
    instances,
    requests_by_instance,
    start_router,
    wait_instances,
)
from tests.pd.server_process import start_server

SECRET = "a-cluster-secret-for-the-router-tests"


@pytest.mark.slow
def test_dp_rank_servers_register_and_cache_aware_keeps_a_prefix(tiny_model, tmp_path):
    env = dict(os.environ, PD_CLUSTER_SECRET=SECRET)
    router = start_router(tmp_path / "router.log", "--policy", "cache_aware", env=env)
    first, second = pick_free_port(), pick_free_port()
    server = None
    try:
        server = start_server(
            tiny_model("qwen2"), tmp_path / "dp2.log", "--data-parallel-size", "2",
            "--ports", f"{first},{second}", "--router", f"127.0.0.1:{router.port}",
            port=first, env=env,
        )  # fmt: skip
        urls = {f"http://127.0.0.1:{port}" for port in (first, second)}
        wait_instances(router, urls)
        known = instances(router)
        assert sorted(known[url]["dp_rank"] for url in urls) == [0, 1]
        assert len({known[url]["model_digest"] for url in urls}) == 1
        client = openai.OpenAI(base_url=router.base_url, api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        system = "You are a terse assistant who answers in one word. " * 3
        for question in ("sky?", "grass?", "sea?", "snow?"):
            client.completions.create(model=model, prompt=system + question, max_tokens=4)
        counts = requests_by_instance(router)
        assert sorted(counts.values()) == [4], counts  # one server took them all
        assert "registered http://127.0.0.1" in server.log()
        assert server.stop() == 0, server.log()
        stopped = instances(router)
        assert [stopped[url]["down_reason"] for url in urls] == ["draining: it is stopping"] * 2
    finally:
        if server is not None:
            assert server.stop() == 0, server.log()
        router.stop()
