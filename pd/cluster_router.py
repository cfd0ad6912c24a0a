"""The router of ``pd-serve cluster --router``: its command line, and waiting until
every instance has registered with it."""

from __future__ import annotations

import sys
import time

import httpx

_REGISTER_TIMEOUT_S = 60.0


def router_command(port: int, policy: str, secret_flags: list[str], passthrough: list[str],
                   is_splitwise: bool = False) -> list[str]:  # fmt: skip
    """``pd-router`` on ``port`` (``is_splitwise``: pairing prefill and decode instances,
    ``policy`` for both) with the instances' cluster secret (their --cluster-secret-file,
    or the one the launcher made; else PD_CLUSTER_SECRET, which it inherits) and their
    --api-key: its own, and the one it presents to them."""
    command = [sys.executable, "-m", "pd.router", "--host", "127.0.0.1", "--port", str(port),
               "--policy", policy, *secret_flags]  # fmt: skip
    if is_splitwise:
        command.append("--splitwise")
    command += flag_values(passthrough, "--cluster-secret-file")
    api_key = flag_values(passthrough, "--api-key")
    if api_key:
        command += [*api_key, "--instance-api-key", api_key[1]]
    return command


def flag_values(argv: list[str], flag: str) -> list[str]:
    """``[flag, value]`` when ``argv`` gives ``flag`` (as ``flag value`` or ``flag=value``)."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return [flag, argv[i + 1]]
        if arg.startswith(flag + "="):
            return [flag, arg.split("=", 1)[1]]
    return []


def wait_registered(port: int, urls: set[str], api_key: str | None, stop: list[int]) -> bool:
    """Whether the router on ``port`` lists every one of ``urls`` as up in time (False at
    once when ``stop`` gets a signal)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + _REGISTER_TIMEOUT_S
    while not stop and time.monotonic() < deadline:
        reply = httpx.get(f"http://127.0.0.1:{port}/router/instances", headers=headers,
                          timeout=10)  # fmt: skip
        if urls <= {r["url"] for r in reply.json()["instances"] if r["is_up"]}:
            return True
        time.sleep(0.2)
    return False
