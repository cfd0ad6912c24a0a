"""``pd-serve cluster`` as a user runs it: one command starts Redis and the instances,
answers a request, and stops everything on Ctrl-C (SIGINT) with exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.slow


def test_cluster_answers_then_stops_cleanly_on_ctrl_c(tiny_model, tmp_path):
    command = [
        sys.executable, "-m", "pd.serve", "cluster", "--model", str(tiny_model("qwen2")),
        "--port", "0", "--log-dir", str(tmp_path), "--ask", "Hello", "--device", "cpu",
        "--max-model-len", "256",
    ]  # fmt: skip
    launcher = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while not any(line.startswith("Ctrl-C stops") for line in lines):
        assert time.monotonic() < deadline and launcher.poll() is None, "".join(lines)
        lines.append(launcher.stdout.readline())
    output = "".join(lines)
    assert "cluster ready (prefill, decode" in output
    assert "\nA: " in output
    base_url = next(line.split()[-1] for line in lines if line.startswith("OpenAI base URL"))
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    reply = client.completions.create(model=client.models.list().data[0].id, prompt="Hi",
                                      max_tokens=4)  # fmt: skip
    assert reply.usage.completion_tokens == 4
    children_file = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    children = [int(pid) for pid in children_file.read_text().split()]
    assert len(children) == 3  # redis-server, prefill, decode
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(60) == 0, launcher.stdout.read()
    for pid in children:  # the instances and Redis are gone too
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived the launcher"
