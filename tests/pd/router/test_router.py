"""``pd-router`` on its own (a real process, the official openai client): OpenAI-style
errors when nothing can serve, registration authenticated with the cluster secret,
conflicting or malformed registrations refused (prefill/decode ones without
--splitwise), its own API key, and its flags."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from cache_transfer.auth import bearer_token
from pd.args import pick_free_port
from pd.router.config import parse_router_args
from pd.router.wire import REGISTER_PATH
from tests.pd.router.router_process import instances, start_router

SECRET = "router-test-secret-0123456789"


def record(url: str, digest: str = "d1", role: str = "mixed") -> dict:
    return {"role": role, "url": url, "model_names": ["m"], "dp_rank": 0,
            "model_digest": digest, "max_model_len": 256, "num_open": 0,
            "num_waiting": 0}  # fmt: skip


def register(root_url: str, body: dict, token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(root_url + REGISTER_PATH, json=body, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    log = tmp_path_factory.mktemp("router") / "router.log"
    server = start_router(log, "--api-key", "client-key",
                          env=dict(os.environ, PD_CLUSTER_SECRET=SECRET))  # fmt: skip
    yield server
    assert server.stop() == 0, server.log()


def test_nothing_registered_is_a_503_in_openai_shape(router):
    client = openai.OpenAI(base_url=router.base_url, api_key="client-key", max_retries=0)
    with pytest.raises(openai.InternalServerError) as error:
        client.completions.create(model="m", prompt="hi", max_tokens=2)
    assert error.value.status_code == 503
    assert "no instance is registered" in error.value.body["message"]
    assert client.models.list().data == []
    health = httpx.get(f"{router.root_url}/health", timeout=10)  # open without the key
    assert health.status_code == 503 and health.json()["status"] == "unhealthy"


def test_the_routers_own_api_key_is_required(router):
    client = openai.OpenAI(base_url=router.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert httpx.get(f"{router.root_url}/metrics", timeout=10).status_code == 401


def test_registration_needs_the_cluster_secrets_token(router):
    url = f"http://127.0.0.1:{pick_free_port()}"
    assert register(router.root_url, record(url), None).status_code == 401
    assert register(router.root_url, record(url), "0" * 64).status_code == 401
    assert register(router.root_url, record(url), bearer_token(SECRET.encode(), "redis")
                    ).status_code == 401  # another purpose's token  # fmt: skip
    assert url not in instances(router, "client-key")
    token = bearer_token(SECRET.encode(), "router")
    reply = register(router.root_url, record(url), token)
    assert reply.status_code == 200 and reply.json()["heartbeat_s"] == pytest.approx(0.3)
    assert url in instances(router, "client-key")  # (the prober may have taken it out)


def test_an_unreachable_instance_is_a_502_and_is_taken_out(router):
    url = f"http://127.0.0.1:{pick_free_port()}"  # nothing listens there
    token = bearer_token(SECRET.encode(), "router")
    assert register(router.root_url, record(url), token).status_code == 200
    body = {"model": "m", "prompt": "hi", "max_tokens": 2}
    reply = httpx.post(f"{router.base_url}/completions", json=body, timeout=30,
                       headers={"authorization": "Bearer client-key"})  # fmt: skip
    assert reply.status_code in (502, 503), reply.text  # 503: the prober was first
    assert reply.json()["error"]["type"] == "server_error"
    assert not instances(router, "client-key")[url]["is_up"]


def test_conflicting_and_malformed_registrations_are_refused(router):
    token = bearer_token(SECRET.encode(), "router")
    first = f"http://127.0.0.1:{pick_free_port()}"
    register(router.root_url, record(first, digest="one"), token)
    # NOTE: the first is up until its heartbeat is missed or a probe fails (0.3 s).
    reply = register(router.root_url, record("http://127.0.0.1:1", digest="two"), token)
    assert reply.status_code in (200, 409)
    if reply.status_code == 409:
        assert "another model" in reply.json()["error"]["message"]
    prefill = register(router.root_url, record("http://127.0.0.1:2", role="prefill"), token)
    assert prefill.status_code == 400 and "--splitwise" in prefill.json()["error"]["message"]
    bad = register(router.root_url, {**record("http://127.0.0.1:3"), "dp_rank": -1}, token)
    assert bad.status_code == 400


def test_a_model_no_instance_serves_is_a_404(router):
    token = bearer_token(SECRET.encode(), "router")
    url = f"http://127.0.0.1:{pick_free_port()}"
    deadline = time.monotonic() + 5
    client = openai.OpenAI(base_url=router.base_url, api_key="client-key", max_retries=0)
    while True:  # keep one registration fresh; the prober may take it out meanwhile
        register(router.root_url, record(url, digest="d-404"), token)
        try:
            client.completions.create(model="not-served", prompt="hi", max_tokens=2)
        except openai.NotFoundError as error:
            assert error.body["code"] == "model_not_found"
            return
        except openai.InternalServerError:
            assert time.monotonic() < deadline
            continue


@pytest.mark.parametrize(("flags", "message"), [
    (["--decode-policy", "random"], "--decode-policy is for prefill/decode pairs"),
    (["--splitwise", "--prefill-policy", "fastest"], "invalid choice: 'fastest'"),
    (["--policy", "fastest"], "invalid choice: 'fastest'"),
    (["--health-interval", "2", "--instance-timeout", "1"], "--instance-timeout must exceed"),
])  # fmt: skip
def test_bad_flags_exit_2_with_one_line(flags, message):
    done = subprocess.run([sys.executable, "-m", "pd.router", *flags], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_splitwise_policies_default_to_policy(monkeypatch):
    monkeypatch.delenv("PD_CLUSTER_SECRET", raising=False)
    config = parse_router_args(["--splitwise", "--policy", "least_load",
                                "--decode-policy", "cache_aware"])  # fmt: skip
    assert (config.splitwise, config.prefill_policy, config.decode_policy) == (
        True, "least_load", "cache_aware")  # fmt: skip
    assert not parse_router_args(["--policy", "random"]).splitwise
