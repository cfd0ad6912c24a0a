"""``pd-serve cluster`` as a user runs it: one command starts Redis (or, with
``--router``, pd-router) and the instances, answers a request, and stops everything on
Ctrl-C (SIGINT) with exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from pd import LLM, SamplingParams
from tests.pd.server_process import ClusterLauncher, spawned_children

pytestmark = pytest.mark.slow


def test_cluster_answers_then_stops_cleanly_on_ctrl_c(tiny_model, tmp_path):
    launcher = ClusterLauncher([
        "--model", str(tiny_model("qwen2")), "--port", "0", "--log-dir", str(tmp_path),
        "--ask", "Hello", "--device", "cpu", "--max-model-len", "256",
    ])  # fmt: skip
    launcher.read_until("Ctrl-C stops", 120)
    assert "cluster ready (prefill, decode" in launcher.output
    assert "\nA: " in launcher.output
    client = openai.OpenAI(base_url=launcher.url("OpenAI base URL"), api_key="x", max_retries=0)
    reply = client.completions.create(model=client.models.list().data[0].id, prompt="Hi",
                                      max_tokens=4)  # fmt: skip
    assert reply.usage.completion_tokens == 4
    children = launcher.children()
    assert len(children) == 3  # redis-server, prefill, decode
    assert launcher.interrupt() == 0, launcher.process.stdout.read()
    for pid in children:  # the instances and Redis are gone too
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived the launcher"


def test_a_killed_instance_is_restarted_and_leaves_no_shared_memory_pool(tiny_model, tmp_path):
    """Issue 17: kill -9 of one engine under ``pd-serve cluster`` tore the whole cluster
    down and left the dead engine's KV pool in /dev/shm."""
    launcher = ClusterLauncher([
        "--model", str(tiny_model("qwen2")), "--port", "0", "--log-dir", str(tmp_path),
        "--device", "cpu", "--max-model-len", "256", "--cache-transfer-protocol", "ipc",
    ])  # fmt: skip
    try:
        launcher.read_until("Ctrl-C stops", 120)
        base_url = launcher.url("OpenAI base URL")
        decode_port = int(launcher.url("decode").rsplit(":", 1)[1].split("/")[0])
        decode_pid = next(
            pid for pid in launcher.children()
            if f"--port {decode_port} ".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
            .replace(b"\0", b" ")
        )  # fmt: skip
        engine_pid = spawned_children(decode_pid)[0]
        pools = list(Path("/dev/shm").glob(f"pd-kv-{engine_pid}-*"))
        assert pools, "the decode engine keeps its KV pool in shared memory"
        os.kill(engine_pid, signal.SIGKILL)
        launcher.read_until("restarted (1 of at most 3)", 60)
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=30)
        model = client.models.list().data[0].id
        deadline = time.monotonic() + 90
        while True:  # the restarted decode rank registers again
            try:
                reply = client.completions.create(model=model, prompt="Hi", max_tokens=4)
                break
            except openai.APIError:
                assert time.monotonic() < deadline, launcher.output
                time.sleep(0.5)
        assert reply.usage.completion_tokens == 4
        assert not any(p.exists() for p in pools), "the dead engine's pool was removed"
        assert launcher.process.poll() is None, "the cluster kept running"
    finally:
        code = launcher.interrupt()
    assert code == 0, launcher.process.stdout.read()


def test_cluster_with_router_pairs_prefill_and_decode_without_redis(tiny_model, tmp_path):
    """1P1D behind pd-router --splitwise, one command: greedy answers equal offline."""
    model_dir = tiny_model("qwen2")
    launcher = ClusterLauncher([
        "--router", "--prefill", "1", "--decode", "1", "--router-policy", "least_load",
        "--model", str(model_dir), "--port", "0", "--log-dir", str(tmp_path), "--ask", "Hello",
        "--device", "cpu", "--max-model-len", "256",
        "--api-key", "cluster-key",  # the router's, and the instances'
    ])  # fmt: skip
    launcher.read_until("Ctrl-C stops", 120)
    assert "cluster ready (prefill, decode" in launcher.output
    assert "embedded Redis" not in launcher.output and "\nA: " in launcher.output
    base_url = launcher.url("OpenAI base URL")
    assert base_url == launcher.url("router")
    client = openai.AsyncOpenAI(base_url=base_url, api_key="cluster-key", max_retries=0)

    texts = [f"Hi {i}" for i in range(8)]

    async def ask_many() -> list[str]:
        model = (await client.models.list()).data[0].id
        replies = await asyncio.gather(*(
            client.completions.create(model=model, prompt=text, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
            for text in texts
        ))  # fmt: skip
        await client.close()
        return [reply.choices[0].text for reply in replies]

    offline = LLM(model=str(model_dir), dtype="float32", max_model_len=256, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert asyncio.run(ask_many()) == [o.outputs[0].text for o in offline.generate(texts, params)]
    metrics = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10,
                        headers={"authorization": "Bearer cluster-key"}).text  # fmt: skip
    ok = [line for line in metrics.splitlines()
          if line.startswith("pd:router_requests_total{") and 'outcome="ok"' in line]  # fmt: skip
    taken = [float(line.rsplit(" ", 1)[1]) for line in ok]
    assert taken == [9, 9]  # --ask and 8 more, each on the prefill and the decode instance
    children = launcher.children()
    assert len(children) == 3  # the router and two instances
    assert launcher.interrupt() == 0, launcher.process.stdout.read()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived the launcher"
