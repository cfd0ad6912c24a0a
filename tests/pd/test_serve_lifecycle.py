"""pd-serve as a process: client disconnects abort, SIGTERM drains, a dead engine
ends the server, and the CLI answers fast."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from pd.cpu_threads import engine_thread_choice
from tests.pd.server_process import ServerProcess, start_server

LONG = {"max_tokens": 900, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    server = start_server(tiny_model("qwen2"), log, "--max-model-len", "1024")
    yield server
    assert server.stop() == 0, server.log()


def wait_until(condition, timeout: float, step: float = 0.05) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


def all_blocks_free(server: ServerProcess) -> bool:
    return server.metric("pd:kv_cache_usage_perc") == 0.0


def test_stream_disconnect_aborts_and_frees_blocks(server):
    aborted = server.metric("pd:request_success_total", 'finished_reason="abort"')
    body = {"model": server_model(server), "prompt": "Tell me a long story", "stream": True}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{server.base_url}/completions", json={**body, **LONG}) as reply,
    ):
        # NOTE: next() keeps the response open; leaving a for loop over
        # iter_lines() would close the generator and so the connection.
        lines = reply.iter_lines()
        num_chunks = 0
        while num_chunks < 3:
            num_chunks += next(lines).startswith("data: ")
        wait_until(lambda: not all_blocks_free(server), 2)  # the request holds blocks
    # Leaving the block closed the connection mid-stream.
    elapsed = wait_until(
        lambda: server.metric("pd:request_success_total", 'finished_reason="abort"') == aborted + 1,
        2,
    )
    wait_until(lambda: all_blocks_free(server), 2 - elapsed)


def test_non_streaming_disconnect_aborts_too(server):
    aborted = server.metric("pd:request_success_total", 'finished_reason="abort"')
    # n=4 makes the work last well past the client's 0.5 s timeout.
    body = {"model": server_model(server), "prompt": "Again, a long one", "n": 4, **LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/completions", json=body, timeout=0.5)
    wait_until(
        lambda: server.metric("pd:request_success_total", 'finished_reason="abort"') == aborted + 1,
        2,
    )
    wait_until(lambda: all_blocks_free(server), 2)


def server_model(server: ServerProcess) -> str:
    return httpx.get(f"{server.base_url}/models", timeout=10).json()["data"][0]["id"]


def stream_in_thread(server: ServerProcess, body: dict) -> tuple[threading.Thread, dict]:
    """Stream a completion in the background; the result dict gets text,
    finish_reason, and any error."""
    result: dict = {"text": "", "finish_reason": None, "error": None}

    def run() -> None:
        try:
            with httpx.stream(
                "POST", f"{server.base_url}/completions", json=body, timeout=60
            ) as reply:
                for line in reply.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        result["error"] = event["error"]
                        continue
                    choice = event["choices"][0]
                    result["text"] += choice["text"]
                    result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
        except httpx.HTTPError as error:
            result["error"] = repr(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_model, tmp_path):
    server = start_server(tiny_model("qwen2"), tmp_path / "log", "--max-model-len", "1024")
    body = {"model": server_model(server), "prompt": "Drain me", "stream": True, **LONG}
    body["max_tokens"] = 300
    thread, result = stream_in_thread(server, body)
    wait_until(lambda: bool(result["text"]), 10)
    server.process.send_signal(signal.SIGTERM)
    thread.join(60)
    assert result["error"] is None and result["finish_reason"] == "length"
    assert server.process.wait(30) == 0, server.log()


@pytest.mark.slow
def test_dead_engine_fails_requests_and_the_server_exits(tiny_model, tmp_path):
    server = start_server(tiny_model("qwen2"), tmp_path / "log", "--max-model-len", "1024")
    body = {"model": server_model(server), "prompt": "Crash", "stream": True, **LONG}
    thread, result = stream_in_thread(server, body)
    wait_until(lambda: bool(result["text"]), 10)
    os.kill(server.engine_pid(), signal.SIGKILL)
    thread.join(10)
    assert not thread.is_alive()
    assert result["error"] is not None and result["finish_reason"] is None
    assert server.process.wait(10) != 0
    assert "engine process exited" in server.log()


def test_the_engine_runs_the_torch_threads_the_policy_chose(server):
    """Each process logs torch's thread count read back after setting it."""
    expected = engine_thread_choice(0, num_engines=1, num_api_servers=1)
    log = server.log()
    found = re.search(r" engine (\d+) torch threads? \((.*?)\); (.*)", log)
    assert found is not None, log
    assert (int(found[1]), found[2]) == (expected.num_threads, expected.reason)
    if not any(name.startswith(("OMP_WAIT", "GOMP_", "KMP_")) for name in os.environ):
        assert found[3] == "OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE)"
    assert "API server: 1 torch thread\n" in log


def test_help_is_fast_and_bad_flags_exit_2():
    start = time.monotonic()
    shown = subprocess.run(
        [sys.executable, "-m", "pd.serve", "--help"], capture_output=True, text=True, timeout=30
    )
    assert shown.returncode == 0 and "--splitwise-role" in shown.stdout
    assert time.monotonic() - start < 3
    bad = subprocess.run(
        [sys.executable, "-m", "pd.serve", "--model", "m", "--block-size", "zero"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--block-size" in bad.stderr


def test_finished_requests_are_counted_once_each(server):
    def count(reason: str) -> float:
        return server.metric("pd:request_success_total", f'finished_reason="{reason}"')

    stops, lengths = count("stop"), count("length")
    prompt_tokens = server.metric("pd:prompt_tokens_total")
    model = server_model(server)
    body = {"model": model, "prompt": "Count me", "max_tokens": 6, "n": 3, "temperature": 0}
    reply = httpx.post(f"{server.base_url}/completions", json={**body, "ignore_eos": True})
    usage = reply.json()["usage"]
    assert count("length") == lengths + 1  # one request, though n=3
    assert server.metric("pd:prompt_tokens_total") == prompt_tokens + usage["prompt_tokens"]
    text = reply.json()["choices"][0]["text"]
    stopped = httpx.post(
        f"{server.base_url}/completions",
        json={**body, "n": 1, "ignore_eos": True, "stop": [text[2:4]]},
    )
    assert stopped.json()["choices"][0]["finish_reason"] == "stop"
    assert count("stop") == stops + 1  # a stop string ends it here, not in the engine
