"""Data parallelism in ``pd-serve`` (real processes, gloo DP group, the official openai
client): two DP ranks behind one API server answer 32 concurrent requests with the
offline engine's greedy tokens, spread over both ranks; a killed DP rank fails its own
requests with a clear error while the other keeps serving; one API server per DP rank
(``--ports``; ``pd-serve multi-api-server`` in tests/pd/test_seed_commands.py) answers
on each port with its own metrics; ranks serving different models refuse to start."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from pd import LLM, SamplingParams
from pd.args import pick_free_port
from tests.cluster.test_pd_parity import complete_all as parity_complete_all
from tests.cluster.test_pd_parity import offline_reference, prompts
from tests.pd.server_process import ServerProcess, start_server, stream_in_background

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def reference(model_dir) -> dict[str, str]:
    return offline_reference(model_dir)


async def complete_all(base_urls: list[str], texts: list[str]) -> list[str]:
    """Every prompt at once over ``base_urls``, asking for the model they serve."""
    return await parity_complete_all(base_urls, texts, model_name(base_urls[0]))


def model_name(base_url: str) -> str:
    return httpx.get(f"{base_url}/models", timeout=10).json()["data"][0]["id"]


def rank_metric(root_url: str, name: str, dp_rank: int) -> float:
    text = httpx.get(f"{root_url}/metrics", timeout=10).text
    match = re.search(rf'^{re.escape(name)}{{dp_rank="{dp_rank}",[^}}]*}} (\S+)$', text, re.M)
    assert match, f"{name} of DP rank {dp_rank} not in /metrics"
    return float(match.group(1))


def wait_rank_metric(root_url: str, name: str, dp_rank: int, expected: float) -> None:
    """The metric reaches ``expected`` (engine stats come every 100 ms)."""
    deadline = time.monotonic() + 5
    while (value := rank_metric(root_url, name, dp_rank)) != expected:
        assert time.monotonic() < deadline, f"{name} of DP rank {dp_rank}: {value}"
        time.sleep(0.1)


def engine_pids(server: ServerProcess) -> dict[int, int]:
    """DP rank -> its engine process's pid, from the start-up log."""
    found = re.findall(r"engine core \(DP rank (\d+)\) pid (\d+)", server.log())
    return {int(rank): int(pid) for rank, pid in found}


def test_two_dp_ranks_behind_one_api_server(model_dir, reference, tmp_path):
    server = start_server(model_dir, tmp_path / "dp2.log", "--data-parallel-size", "2")
    try:
        texts = prompts()
        assert asyncio.run(complete_all([server.base_url], texts)) == [reference[p] for p in texts]
        deadline = time.monotonic() + 5  # stats come every 100 ms
        while sum(taken := server.metric_samples("pd:dp_rank_requests_total")) < len(texts):
            assert time.monotonic() < deadline, taken
            time.sleep(0.1)
        assert sum(taken) == len(texts)
        assert min(taken) >= len(texts) // 4, f"not balanced: {taken}"
        assert "DP rank 1" in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_a_killed_dp_rank_fails_its_requests_and_the_other_serves(model_dir, reference, tmp_path):
    server = start_server(model_dir, tmp_path / "dp2.log", "--data-parallel-size", "2",
                          "--max-model-len", "512")  # fmt: skip
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        stream = stream_in_background(client, model, "Crash", 480)
        deadline = time.monotonic() + 30
        busy: list[int] = []
        while not busy and time.monotonic() < deadline:  # stats come every 100 ms
            busy = [r for r in (0, 1) if rank_metric(server.root_url, "pd:num_requests_running", r)]
        assert len(busy) == 1, busy
        dead_rank = busy[0]
        engine_pid = engine_pids(server)[dead_rank]
        subprocess.run(["kill", "-9", str(engine_pid)], check=True)
        stream.wait_end(15)
        assert stream.errors and 0 < len(stream.chunks) < 480
        assert f"engine process exited with code {-signal.SIGKILL}" in str(stream.errors[0])
        # Failed by its rank's death: an error, as when a lone engine dies, not an abort.
        assert server.metric("pd:request_success_total", 'finished_reason="error"') == 1
        assert server.metric("pd:request_success_total", 'finished_reason="abort"') == 0
        assert rank_metric(server.root_url, "pd:num_requests_running", dead_rank) == 0
        # The other rank serves every later request; the dead one takes none.
        texts = prompts(8, seed=3)
        expected = LLM(model=str(model_dir), dtype="float32", max_model_len=512, device="cpu")
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        want = [o.outputs[0].text for o in expected.generate(texts, params)]
        assert asyncio.run(complete_all([server.base_url], texts)) == want
        wait_rank_metric(server.root_url, "pd:dp_rank_up", dead_rank, 0.0)
        assert rank_metric(server.root_url, "pd:dp_rank_up", 1 - dead_rank) == 1.0
        health = httpx.get(f"{server.root_url}/health", timeout=10)
        assert health.status_code == 200, health.text
        assert f"DP rank {dead_rank}: engine dead" in server.log()
    finally:
        code = server.stop()
    assert code == 1, "a DP rank died: the instance's exit says so"


def test_one_api_server_per_dp_rank_with_ports(model_dir, reference, tmp_path):
    first, second, metrics_a, metrics_b = (pick_free_port() for _ in range(4))
    server = start_server(
        model_dir, tmp_path / "ports.log", "--data-parallel-size", "2",
        "--ports", f"{first},{second}", "--metrics-ports", f"{metrics_a},{metrics_b}",
        port=first,
    )  # fmt: skip
    try:
        assert f"http://127.0.0.1:{second}/v1" in server.log()
        urls = [f"http://127.0.0.1:{port}/v1" for port in (first, second)]
        texts = prompts(8)
        assert asyncio.run(complete_all(urls, texts)) == [reference[p] for p in texts]
        for dp_rank, metrics_port in enumerate((metrics_a, metrics_b)):
            root = f"http://127.0.0.1:{metrics_port}"
            wait_rank_metric(root, "pd:dp_rank_requests_total", dp_rank, 4)
    finally:
        assert server.stop() == 0, server.log()


def test_dp_ranks_serving_different_models_refuse_to_start(tiny_model, tmp_path):
    """Two halves of one instance started by hand with different checkpoints: the DP
    group's start-up check names the difference, and both exit."""
    rpc = str(pick_free_port())
    common = ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
              "--data-parallel-rpc-port", rpc]  # fmt: skip
    logs, processes = [], []
    for dp_rank, arch in enumerate(("qwen2", "llama")):
        log_path = tmp_path / f"rank{dp_rank}.log"
        command = [
            sys.executable, "-m", "pd.serve", "--model", str(tiny_model(arch)),
            "--host", "127.0.0.1", "--port", str(pick_free_port()), "--device", "cpu",
            "--dtype", "float32", "--max-model-len", "256",
            "--data-parallel-start-rank", str(dp_rank), *common,
        ]  # fmt: skip
        with log_path.open("w") as log:
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log_path)
    codes = [p.wait(120) for p in processes]
    assert codes == [1, 1]
    for log_path in logs:
        assert "the DP ranks do not serve the same model" in log_path.read_text()


def test_a_dp_rank_failing_its_start_up_fails_the_instance_and_stops_the_others(
    model_dir, tmp_path
):
    """DP rank 1 cannot bind its queue port: pd-serve exits 1 naming it, and DP rank 0's
    engine (waiting for rank 1 in the DP group) does not outlive it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        log_path = tmp_path / "fail.log"
        command = [
            sys.executable, "-m", "pd.serve", "--model", str(model_dir), "--host", "127.0.0.1",
            "--port", str(pick_free_port()), "--device", "cpu", "--dtype", "float32",
            "--max-model-len", "256", "--data-parallel-size", "3",
            "--engine-worker-queue-port", f"0,0,{busy_port}",
        ]  # fmt: skip
        with log_path.open("w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = process.wait(120)
        finally:
            if process.poll() is None:
                process.kill()
    log = log_path.read_text()
    assert code == 1, log
    assert "start-up failed: the engine process of DP rank 2 exited during start-up" in log
    pids = re.findall(r"engine core \(DP rank [01]\) pid (\d+)", log)
    assert len(pids) == 2, log
    for pid in pids:
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text(), f"engine {pid} lives"


def test_engines_outlive_no_api_server_killed_while_they_start(model_dir, tmp_path):
    """SIGKILL of pd-serve while its DP ranks load: each engine, once loaded, sees its API
    server gone and exits (it looked for it only after loading, as a pid then: init's)."""
    log_path = tmp_path / "killed.log"
    command = [
        sys.executable, "-m", "pd.serve", "--model", str(model_dir), "--host", "127.0.0.1",
        "--port", str(pick_free_port()), "--device", "cpu", "--dtype", "float32",
        "--max-model-len", "256", "--data-parallel-size", "2",
    ]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while (
            len(pids := re.findall(r"engine core \(DP rank \d\) pid (\d+)", log_path.read_text()))
            < 2
        ):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 30  # a tiny model loads in seconds
        alive = list(pids)
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in pids if _running(int(pid))]
        for pid in alive:  # left by the failure: stop them
            os.kill(int(pid), signal.SIGKILL)
        assert not alive, f"engines {alive} outlived their API server:\n{log_path.read_text()}"
    finally:
        if process.poll() is None:
            process.kill()


def _running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except FileNotFoundError:
        return False
