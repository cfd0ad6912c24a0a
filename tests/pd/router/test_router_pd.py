"""Prefill/decode pairs through ``pd-router --splitwise``, no Redis (real processes, the
official openai client, a cluster secret): two prefill and two decode instances answer
concurrent requests exactly as the offline engine does, over every instance; the
cache_aware prefill policy keeps a shared prefix on one prefill instance, whose prefix
cache serves it; a prefill instance refuses pairings that do not come from the router;
a killed decode rank fails its in-flight request within the silence bound, and later
requests avoid it.

NOTE: the tests share one cluster and run in file order; the last one kills a decode
instance.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from pd import LLM, SamplingParams
from pd.router.wire import DECODE_RANK_HEADER, PAIR_TOKEN_HEADER, pair_token
from tests.cluster.test_pd_parity import prompts
from tests.pd.router.router_process import (
    instances,
    requests_by_instance,
    start_router,
    wait_instances,
)
from tests.pd.server_process import ServerProcess, start_server, stream_in_background

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
SECRET = "router-pd-test-secret-0123456789"
# a rank silent for 3 expire periods (3 s here) has lost its requests
SILENCE_BOUND_S = 3.0


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """(router, prefill instances, decode instances), all registered and up."""
    logs = tmp_path_factory.mktemp("router-pd")
    env = dict(os.environ, PD_CLUSTER_SECRET=SECRET)
    router = start_router(logs / "router.log", "--splitwise", "--prefill-policy", "cache_aware",
                          "--decode-policy", "round_robin", env=env)  # fmt: skip
    flags = ["--router", f"127.0.0.1:{router.port}", "--scheduler-expire-period", "1000",
             "--max-model-len", "512"]  # fmt: skip
    roles = ["prefill", "prefill", "decode", "decode"]
    with ThreadPoolExecutor(len(roles)) as pool:  # start-up is mostly loading: in parallel
        starts = [
            pool.submit(
                start_server,
                model_dir,
                logs / f"{role}{i}.log",
                "--splitwise-role",
                role,
                *flags,
                env=env,
            )
            for i, role in enumerate(roles)
        ]
        servers: list[ServerProcess] = [start.result() for start in starts]
    try:
        wait_instances(router, {s.root_url for s in servers})
        yield router, servers[:2], servers[2:]
    finally:
        for server in servers:
            server.stop()
        router.stop()


def offline(model_dir: Path, texts: list[str], max_tokens: int = MAX_TOKENS) -> list[str]:
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(texts, params)]


async def complete(base_url: str, texts: list[str]) -> list[str]:
    """Every prompt at once, streamed and not in turn."""
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0,
                                  timeout=60) as client:  # fmt: skip
        model = (await client.models.list()).data[0].id

        async def one(i: int, prompt: str) -> str:
            reply = await client.completions.create(
                model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                stream=i % 2 == 1, extra_body={"ignore_eos": True},
            )  # fmt: skip
            if i % 2 == 0:
                return reply.choices[0].text
            return "".join([chunk.choices[0].text async for chunk in reply])

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(texts)))


def test_2p2d_greedy_outputs_equal_offline_over_every_instance(cluster, model_dir):
    router, prefills, decodes = cluster
    texts = prompts(24, seed=5)
    assert asyncio.run(complete(router.base_url, texts)) == offline(model_dir, texts)
    taken = requests_by_instance(router)
    for server in (*prefills, *decodes):
        assert taken.get(server.root_url, 0) > 0, taken
    # Decode ranks got their requests only from prefill ranks, never through their API.
    for decode in decodes:
        assert decode.metric("pd:request_success_total", 'finished_reason="length"') == 0


def test_cache_aware_keeps_a_shared_prefix_on_one_prefill_instance(cluster):
    router, prefills, _ = cluster
    hits_before = [p.metric("pd:prefix_cache_hits_total") for p in prefills]
    taken_before = requests_by_instance(router)
    prefix = "rank queue redis stream token " * 12  # ~60 tokens: several whole KV blocks
    with openai.OpenAI(base_url=router.base_url, api_key="x", max_retries=0) as client:
        model = client.models.list().data[0].id
        for i in range(6):
            client.completions.create(model=model, prompt=f"{prefix}question {i}",
                                      max_tokens=2, temperature=0)  # fmt: skip
    taken = requests_by_instance(router)
    sent = [taken.get(p.root_url, 0) - taken_before.get(p.root_url, 0) for p in prefills]
    assert sorted(sent) == [0, 6], sent
    chosen = sent.index(6)
    hits = [p.metric("pd:prefix_cache_hits_total") - b for p, b in zip(prefills, hits_before,
                                                                       strict=True)]  # fmt: skip
    assert hits[chosen] >= 5 * 32 and hits[1 - chosen] == 0, hits  # 5 repeats, 2+ blocks each


def test_a_prefill_instance_refuses_pairings_that_are_not_the_routers(cluster, model_dir):
    _, prefills, decodes = cluster
    record = instances(cluster[0])[decodes[0].root_url]["pd_ranks"][0]
    prefill_record = instances(cluster[0])[prefills[0].root_url]["pd_ranks"][0]
    secret = SECRET.encode()
    body = {"model": str(model_dir), "prompt": "Hello", "max_tokens": 2}

    def paired(encoded: str, token_for: str | None = None) -> dict[str, str]:
        token = pair_token(secret, encoded if token_for is None else token_for)
        return {DECODE_RANK_HEADER: encoded, PAIR_TOKEN_HEADER: token}

    junk = base64.b64encode(b"\x08\x07junk").decode()
    cases = [
        ({}, 400, "send them to the router"),
        ({DECODE_RANK_HEADER: record}, 401, "cluster secret's token"),
        ({DECODE_RANK_HEADER: record, PAIR_TOKEN_HEADER: "0" * 64}, 401, "token"),
        # a token seen on the wire pairs with nothing but its own rank
        (paired(prefill_record, token_for=record), 401, "token"),
        (paired("%%%"), 400, "not a decode rank's"),
        (paired(junk), 400, "not a decode rank's"),
        (paired(prefill_record), 400, "prefill rank"),
    ]
    for headers, status, message in cases:
        reply = httpx.post(f"{prefills[0].base_url}/completions", json=body, headers=headers,
                           timeout=30)  # fmt: skip
        assert reply.status_code == status, (headers, reply.text)
        assert message in reply.json()["error"]["message"]
    # With the router's token and a decode rank's record, it serves.
    reply = httpx.post(f"{prefills[0].base_url}/completions", json=body, timeout=30,
                       headers=paired(record))  # fmt: skip
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


def test_a_killed_decode_rank_fails_its_request_and_later_ones_avoid_it(cluster, model_dir):
    router, prefills, decodes = cluster
    client = openai.OpenAI(base_url=router.base_url, api_key="x", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    # round_robin over the decode instances: two streams, one on each
    streams = [stream_in_background(client, model, f"Crash {i}", 480) for i in range(2)]
    deadline = time.monotonic() + 10
    while (running := [d.metric("pd:num_requests_running") for d in decodes]) != [1.0, 1.0]:
        assert time.monotonic() < deadline, running  # stats come every 100 ms
        time.sleep(0.05)
    victim, survivor = decodes
    os.kill(victim.engine_pid(), signal.SIGKILL)
    killed_at = time.monotonic()
    failed = []
    for stream in streams:
        stream.wait_end(60)
        if stream.errors:
            failed.append(time.monotonic() - killed_at)
    assert len(failed) == 1, [s.errors for s in streams]
    error = next(str(s.errors[0]) for s in streams if s.errors)
    assert "stopped answering" in error, error
    assert failed[0] < SILENCE_BOUND_S + 5, failed
    assert next(s for s in streams if not s.errors).chunks  # the other one ran to the end
    victim.process.wait(30)  # its API server stops with its only rank
    wait_instances(router, {s.root_url for s in (*prefills, survivor)})
    texts = prompts(8, seed=11)
    assert asyncio.run(complete(router.base_url, texts)) == offline(model_dir, texts)
