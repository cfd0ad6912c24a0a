"""Start a real ``pd-router`` process for tests, and read what it knows."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from pd.args import pick_free_port
from tests.pd.server_process import ServerProcess, start_command


def start_router(
    log_path: Path, *extra: str, port: int | None = None, env: Mapping[str, str] | None = None
) -> ServerProcess:
    """``python -m pd.router`` on 127.0.0.1, probing every 0.3 s and dropping an
    instance silent for 2 s; ready once it listens."""
    port = port or pick_free_port()
    command = [
        sys.executable, "-m", "pd.router", "--host", "127.0.0.1", "--port", str(port),
        "--health-interval", "0.3", "--instance-timeout", "2", *extra,
    ]  # fmt: skip
    return start_command(command, log_path, port, env, ready_text="pd-router ready")


def instances(router: ServerProcess, api_key: str | None = None) -> dict[str, dict]:
    """URL -> what the router knows of that instance."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    reply = httpx.get(f"{router.root_url}/router/instances", headers=headers, timeout=10)
    return {record["url"]: record for record in reply.json()["instances"]}


def wait_instances(router: ServerProcess, expected_up: set[str], timeout: float = 30) -> None:
    """Until exactly ``expected_up`` are the router's up instances."""
    deadline = time.monotonic() + timeout
    while True:
        up = {url for url, record in instances(router).items() if record["is_up"]}
        if up == expected_up:
            return
        assert time.monotonic() < deadline, f"up: {up}, expected {expected_up}"
        time.sleep(0.1)


def requests_by_instance(router: ServerProcess, outcome: str = "ok") -> dict[str, float]:
    """pd:router_requests_total per instance, for one outcome."""
    text = httpx.get(f"{router.root_url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("pd:router_requests_total{") and f'outcome="{outcome}"' in line:
            url = line.split('instance="', 1)[1].split('"', 1)[0]
            counts[url] = float(line.rsplit(" ", 1)[1])
    return counts
