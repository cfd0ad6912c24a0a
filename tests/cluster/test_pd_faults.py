"""Faults in a real cluster end in a bounded, explained failure or a retry, never a hang,
and leave every surviving rank's KV blocks free: a decode rank killed mid-stream, a
prefill rank killed with queued requests, a KV-layout mismatch (refused by name, then
retried elsewhere), Redis restarting under load, clients disconnecting at every stage."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import openai
import pytest

from tests.cluster.cluster import EXPIRE_PERIOD_MS, Cluster, wait_blocks_free

pytestmark = pytest.mark.slow

BOUND_S = EXPIRE_PERIOD_MS / 1000 + 2.0  # the bound on a lost rank's requests
PROMPT = "prefill decode cache block layer token"


def client(server, timeout: float = 60) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=timeout)


def complete(server, prompt: str = PROMPT, max_tokens: int = 8) -> str:  # type: ignore[no-untyped-def]
    reply = client(server).completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert reply.usage.completion_tokens == max_tokens
    return reply.choices[0].text


def outcome(server, prompt: str, max_tokens: int) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    """("ok" or the error message, when it ended)."""
    try:
        complete(server, prompt, max_tokens)
        return "ok", time.monotonic()
    except openai.APIError as e:
        return str(e), time.monotonic()


def wait_until(condition, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.02)


def test_decode_rank_killed_mid_stream(make_cluster):
    cluster: Cluster = make_cluster()
    prefill = cluster.start("prefill")
    decodes = [cluster.start("decode"), cluster.start("decode")]
    streams_ended: list[tuple[str, float]] = []
    started = threading.Semaphore(0)

    def stream() -> None:
        try:
            chunks = client(prefill).completions.create(
                model="tiny", prompt=PROMPT, max_tokens=220, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            for i, _ in enumerate(chunks):
                if i == 2:
                    started.release()
            streams_ended.append(("ok", time.monotonic()))
        except openai.APIError as e:
            streams_ended.append((str(e), time.monotonic()))

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert started.acquire(timeout=30), streams_ended
    busy = max(decodes, key=lambda d: d.metric("pd:num_requests_running"))
    cluster.kill(busy)
    killed_at = time.monotonic()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a stream hangs"
    failed = [(message, at) for message, at in streams_ended if message != "ok"]
    assert failed, "the killed decode rank was running none of the streams"
    for message, at in failed:
        assert f"decode instance {cluster.rank_id(busy)} lost" in message
        assert at - killed_at < BOUND_S
    survivor = next(d for d in decodes if d is not busy)
    for _ in range(4):
        complete(prefill)
    wait_blocks_free([prefill, survivor])


def test_prefill_rank_killed_with_queued_requests(make_cluster):
    cluster: Cluster = make_cluster()
    survivor = cluster.start("prefill")
    # One request at a time, prefilled 16 tokens a step: the others wait in its queue.
    victim = cluster.start("prefill", "--max-num-seqs", "1", "--max-num-batched-tokens", "16")
    decode = cluster.start("decode")
    queue = cluster.keys.queue(cluster.rank_id(victim))
    redis_client = cluster.redis_client()
    long_prompt = " ".join([PROMPT] * 7)  # ~170 tokens
    with ThreadPoolExecutor(max_workers=24) as pool:
        futures = [pool.submit(outcome, survivor, long_prompt, 4) for _ in range(24)]
        try:
            wait_until(lambda: redis_client.llen(queue) >= 2, 30, "requests queued on the victim")
        except AssertionError as e:  # it failed once in CI without a clue: say where they went
            ended = [f.result()[0][:120] for f in futures if f.done()]
            logs = {s.log_path.name: s.log()[-1500:] for s in (survivor, victim, decode)}
            raise AssertionError(f"{e}; {len(ended)} of 24 ended: {ended[:3]}; logs: {logs}") from e
        cluster.kill(victim)
        results = [f.result(timeout=60) for f in futures]
    failed = [message for message, _ in results if message != "ok"]
    assert len(failed) <= 1, failed  # at most what it had taken (capacity 1)
    for message in failed:
        assert f"prefill instance {cluster.rank_id(victim)} lost" in message
    assert redis_client.llen(queue) == 0
    wait_blocks_free([survivor, decode])


def test_layout_mismatch_is_refused_by_name_then_retried_elsewhere(make_cluster):
    cluster: Cluster = make_cluster()
    prefill = cluster.start("prefill")
    cluster.start("decode", "--block-size", "8")
    with pytest.raises(openai.APIError) as refused:
        complete(prefill)
    assert "KV layouts differ in block_size: 16 on prefill" in str(refused.value)
    good = cluster.start("decode")
    texts = {complete(prefill) for _ in range(6)}  # some dispatched to the bad one first
    assert len(texts) == 1
    assert prefill.metric("pd:kv_reservation_refusals_total", 'protocol="ipc"') >= 1
    wait_blocks_free([prefill, good])


def test_redis_restart_under_load(make_cluster, redis_server):
    cluster: Cluster = make_cluster()
    prefill, decode = cluster.start("prefill"), cluster.start("decode")
    expected = complete(prefill)
    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(outcome, prefill, PROMPT, 64) for _ in range(32)]
        time.sleep(0.3)
        redis_server.kill()
        redis_server.start()
        results = [f.result(timeout=60) for f in futures]
    # Each ends: served, or a 503 that says why (Redis down, ranks not re-registered
    # yet, or a request that had started and was lost with Redis's lists).
    explained = ("ok", "Redis", "lost", "no live")  # "no live prefill|decode rank"
    for message, _ in results:
        assert any(word in message for word in explained), message
    assert sum(message == "ok" for message, _ in results) > 0
    # No instance was restarted: new requests are served once the ranks re-registered.
    wait_until(lambda: outcome(prefill, PROMPT, 8)[0] == "ok", 10, "serving after the restart")
    assert complete(prefill) == expected
    wait_blocks_free([prefill, decode])


def test_client_disconnects_at_every_stage(make_cluster):
    cluster: Cluster = make_cluster()
    prefill = cluster.start("prefill", "--max-num-seqs", "2", "--max-num-batched-tokens", "16")
    decode = cluster.start("decode")
    body = {"model": "tiny", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    long_prompt = " ".join([PROMPT] * 7)

    def disconnect(after_chunks: int, delay_s: float, prompt: str) -> None:
        """Stream and hang up after ``after_chunks`` chunks, or after ``delay_s`` when 0
        (before the first token: queued, prefilling or transferring)."""
        request = {**body, "prompt": prompt, "stream": True}
        timeout = httpx.Timeout(30, read=delay_s if after_chunks == 0 else 30)
        try:
            with httpx.stream("POST", f"{prefill.base_url}/completions", json=request,
                              timeout=timeout) as response:  # fmt: skip
                for i, _ in enumerate(response.iter_lines()):
                    if i >= after_chunks * 2:  # "data: ..." and a blank line per chunk
                        return
        except httpx.ReadTimeout:
            return

    stages = [(0, d, long_prompt) for d in (0.01, 0.03, 0.06, 0.1, 0.2)]
    stages += [(k, 0, PROMPT) for k in (1, 2, 5, 20)]
    with ThreadPoolExecutor(max_workers=len(stages)) as pool:
        list(pool.map(lambda s: disconnect(*s), stages * 2))
    redis_client = cluster.redis_client()
    for server in (prefill, decode):
        proc = cluster.keys.processing(cluster.rank_id(server))
        wait_until(lambda p=proc: redis_client.llen(p) == 0, 10, f"{proc} empty")
    wait_blocks_free([prefill, decode])
    complete(prefill)


def test_a_stopping_decode_rank_finishes_what_it_runs(make_cluster):
    """Issue 17: a decode instance told to stop (SIGTERM) takes no new reservation and
    finishes the requests it runs (for other API servers too) before it exits 0; what is
    still running at the drain bound ends with an explained error."""
    cluster: Cluster = make_cluster()
    prefill, decode = cluster.start("prefill"), cluster.start("decode")
    ended: list[tuple[str, float]] = []  # (outcome, wall-clock end)
    started = threading.Semaphore(0)

    def stream() -> None:
        try:
            chunks = client(prefill).completions.create(
                model="tiny", prompt=PROMPT, max_tokens=200, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )  # fmt: skip
            num_tokens = 0
            for i, chunk in enumerate(chunks):
                if i == 2:
                    started.release()
                if chunk.usage is not None:
                    num_tokens = chunk.usage.completion_tokens
            ended.append(("ok" if num_tokens == 200 else f"{num_tokens} tokens", time.time()))
        except openai.APIError as e:
            ended.append((str(e), time.time()))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert started.acquire(timeout=30), ended
    assert decode.stop() == 0, decode.log()[-3000:]
    for thread in threads:
        thread.join(timeout=30)
    drain_line = next((line for line in decode.log().splitlines() if "drains" in line), None)
    assert drain_line is not None, "the decode rank drained"
    drain_started = datetime.strptime(drain_line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    for outcome, _ in ended:
        assert outcome == "ok" or "stopped before the request finished" in outcome, outcome
    assert any(o == "ok" and at > drain_started for o, at in ended), (drain_line, ended)


def test_a_stream_whose_request_vanished_ends_with_an_error(make_cluster):
    """Issue 17: a stream whose request vanished from the cluster (here: its Redis entry
    deleted while its prefill rank was frozen) waited for the client's own timeout; the
    API server now ends it once nothing came for --scheduler-ttl plus two periods."""
    import os
    import signal

    cluster: Cluster = make_cluster()
    # The frozen prefill rank stays registered for a 5 s period: the request goes to it.
    flags = ("--scheduler-ttl", "2", "--scheduler-expire-period", "5000")
    prefill, decode = cluster.start("prefill", *flags), cluster.start("decode", *flags)
    complete(decode)  # the API server of the decode instance dispatches to the prefill rank
    engine_pid = prefill.engine_pid()
    os.kill(engine_pid, signal.SIGSTOP)
    try:
        outcome_of: list[tuple[str, float]] = []
        started = time.monotonic()
        asking = threading.Thread(target=lambda: outcome_of.append(outcome(decode, PROMPT, 4)))
        asking.start()
        redis_client = cluster.redis_client()
        rank_id = cluster.rank_id(prefill)
        # Queued, or taken: a BLMOVE the rank sent before it froze still moves it.
        lists = [cluster.keys.queue(rank_id), cluster.keys.processing(rank_id)]
        is_in_redis = lambda: any(redis_client.llen(k) for k in lists) or outcome_of  # noqa: E731
        wait_until(is_in_redis, 5, "the request is in Redis")
        assert not outcome_of, outcome_of
        redis_client.delete(*lists)  # the request vanishes
        asking.join(timeout=30)
        assert not asking.is_alive(), "the stream ended"
        (message, ended) = outcome_of[0]
        assert "no output for" in message and ended - started < 2 + 2 * 5 + 5, message
    finally:
        os.kill(engine_pid, signal.SIGCONT)
    wait_until(lambda: outcome(decode, PROMPT, 4)[0] == "ok", 20, "served again")
