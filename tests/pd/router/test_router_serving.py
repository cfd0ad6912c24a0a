"""Two mixed ``pd-serve`` instances behind ``pd-router`` (real processes, the official
openai client): 64 concurrent requests (completions and chat, streamed and not) answer
exactly as one instance does, spread round-robin (the router's per-instance counters);
a client that goes away aborts its request on the instance; an instance that stops
answering is dropped and taken back; a restarted router learns the instances back;
a killed instance fails its in-flight requests with a clear error and later ones all
succeed on the other.

NOTE: the tests share one router and two instances and run in file order; the last
one kills an instance.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.cluster.test_pd_parity import prompts
from tests.pd.router.router_process import (
    instances,
    requests_by_instance,
    start_router,
    wait_instances,
)
from tests.pd.server_process import ServerProcess, start_server

MAX_TOKENS = 8
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """(router, [instance a, instance b]), both registered and up."""
    logs = tmp_path_factory.mktemp("router-cluster")
    router = start_router(logs / "router.log", "--policy", "round_robin")
    address = f"127.0.0.1:{router.port}"
    servers: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            servers.append(start_server(model_dir, logs / f"{name}.log", "--router", address,
                                        "--max-num-seqs", "64", "--max-model-len",
                                        "1024"))  # fmt: skip
        wait_instances(router, {s.root_url for s in servers})
        yield router, servers
    finally:
        for server in servers:
            server.stop()
        router.stop()


async def ask(client: openai.AsyncOpenAI, model: str, index: int, prompt: str) -> str:
    """One request; by ``index``: completion or chat, streamed or not."""
    common = dict(model=model, max_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"ignore_eos": True})  # fmt: skip
    is_chat, is_stream = index % 4 >= 2, index % 2 == 1
    if is_chat:
        messages = [{"role": "user", "content": prompt}]
        reply = await client.chat.completions.create(messages=messages, stream=is_stream,
                                                     **common)  # fmt: skip
        if not is_stream:
            return reply.choices[0].message.content
        return "".join([c.choices[0].delta.content or "" async for c in reply if c.choices])
    reply = await client.completions.create(prompt=prompt, stream=is_stream, **common)
    if not is_stream:
        return reply.choices[0].text
    return "".join([c.choices[0].text async for c in reply])


async def ask_all(base_url: str, model: str, texts: list[str]) -> list[str]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0,
                                  timeout=120) as client:  # fmt: skip
        return await asyncio.gather(*(ask(client, model, i, p) for i, p in enumerate(texts)))


def model_name(server: ServerProcess) -> str:
    return httpx.get(f"{server.base_url}/models", timeout=10).json()["data"][0]["id"]


def test_64_concurrent_requests_equal_one_instance_and_spread_round_robin(cluster):
    router, (a, b) = cluster
    texts = prompts(64, seed=7)
    model = model_name(a)
    expected = asyncio.run(ask_all(a.base_url, model, texts))  # one instance alone
    before_b = sum(b.metric_samples("pd:request_success_total"))
    assert asyncio.run(ask_all(router.base_url, model, texts)) == expected
    assert requests_by_instance(router) == {a.root_url: 32, b.root_url: 32}
    assert sum(b.metric_samples("pd:request_success_total")) - before_b == 32  # the instance agrees
    listed = openai.OpenAI(base_url=router.base_url, api_key="x").models.list()
    assert [card.id for card in listed.data] == [model]


def test_a_client_that_goes_away_aborts_its_request_on_the_instance(cluster):
    router, servers = cluster
    aborted_before = sum(s.metric("pd:request_success_total", 'finished_reason="abort"')
                         for s in servers)  # fmt: skip
    client = openai.OpenAI(base_url=router.base_url, api_key="x", max_retries=0)
    stream = client.completions.create(model=model_name(servers[0]), prompt="count on",
                                       max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while sum(s.metric("pd:request_success_total", 'finished_reason="abort"')
              for s in servers) == aborted_before:  # fmt: skip
        assert time.monotonic() < deadline, "the instance did not abort the request"
        time.sleep(0.2)
    assert sum(requests_by_instance(router, "aborted").values()) == 1


def test_an_instance_that_stops_answering_is_dropped_and_taken_back(cluster):
    router, (a, b) = cluster
    os.kill(a.process.pid, signal.SIGSTOP)  # no heartbeat, no /health
    try:
        started = time.monotonic()
        wait_instances(router, {b.root_url}, timeout=10)
        assert time.monotonic() - started < 5  # --instance-timeout 2, probes every 0.3 s
        before = requests_by_instance(router)
        texts = prompts(6, seed=8)
        asyncio.run(ask_all(router.base_url, model_name(b), texts))
        after = requests_by_instance(router)
        assert after[b.root_url] - before[b.root_url] == len(texts)
        assert after[a.root_url] == before[a.root_url]
    finally:
        os.kill(a.process.pid, signal.SIGCONT)
    wait_instances(router, {a.root_url, b.root_url}, timeout=10)
    deadline = time.monotonic() + 5  # the log line may land just after the state flips
    while "is back" not in router.log():
        assert time.monotonic() < deadline, router.log()
        time.sleep(0.1)


def test_a_restarted_router_learns_the_instances_back(cluster, tmp_path):
    router, (a, b) = cluster
    assert router.stop() == 0, router.log()
    restarted = start_router(tmp_path / "router2.log", "--policy", "round_robin",
                             port=router.port)  # fmt: skip
    router.process = restarted.process  # the fixture stops this one
    router.log_path = restarted.log_path
    wait_instances(router, {a.root_url, b.root_url}, timeout=10)
    texts = prompts(4, seed=9)
    assert asyncio.run(ask_all(router.base_url, model_name(a), texts)) == asyncio.run(
        ask_all(a.base_url, model_name(a), texts)
    )


def test_a_killed_instance_fails_its_in_flight_requests_and_the_other_serves(cluster):
    router, (a, b) = cluster
    model = model_name(a)

    async def scenario() -> tuple[list[object], list[str]]:
        async with openai.AsyncOpenAI(base_url=router.base_url, api_key="x", max_retries=0,
                                      timeout=120) as client:  # fmt: skip
            first_tokens = asyncio.Queue()

            async def long_stream(index: int) -> object:
                try:
                    stream = await client.completions.create(
                        model=model, prompt=f"story {index}", max_tokens=960, stream=True,
                        extra_body={"ignore_eos": True},
                    )  # fmt: skip
                    chunks = 0
                    async for _ in stream:
                        chunks += 1
                        if chunks == 1:
                            await first_tokens.put(index)
                    return chunks
                except openai.APIError as error:
                    await first_tokens.put(index)  # (in case it failed before a token)
                    return error

            tasks = [asyncio.create_task(long_stream(i)) for i in range(8)]
            for _ in tasks:
                await first_tokens.get()  # every stream is under way on its instance
            os.kill(b.process.pid, signal.SIGKILL)
            outcomes = await asyncio.gather(*tasks)
            later = await asyncio.gather(*(ask(client, model, i, f"after {i}") for i in range(16)))
            return outcomes, later

    before = requests_by_instance(router)
    outcomes, later = asyncio.run(scenario())
    failed = [o for o in outcomes if isinstance(o, openai.APIError)]
    assert len(failed) == 4, outcomes  # round robin: half of them were on b
    for error in failed:
        assert f"the instance {b.root_url} failed while answering" in error.message
    assert all(o > 1 for o in outcomes if not isinstance(o, openai.APIError))
    assert len(later) == 16 and all(later)
    after = requests_by_instance(router)
    assert after[a.root_url] - before.get(a.root_url, 0) == 4 + 16
    assert requests_by_instance(router, "broken") == {b.root_url: 4}
    assert not instances(router)[b.root_url]["is_up"]
