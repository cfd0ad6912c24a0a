"""tcp transfer between two network namespaces joined by a veth pair: two "hosts"."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and the ip tool")
    tag = uuid.uuid4().hex[:6]
    a, b = f"pd-a-{tag}", f"pd-b-{tag}"
    try:
        ip("netns", "add", a)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"ip netns is not allowed here: {e.stderr.decode().strip()}")
    try:
        ip("netns", "add", b)
        ip("link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", f"vb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"va{tag}", "10.77.0.1/24"), (b, f"vb{tag}", "10.77.0.2/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_tcp_transfer_across_namespaces(two_hosts: tuple[str, str]) -> None:
    a, b = two_hosts
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", b, sys.executable, str(HERE / "kv_receiver.py"),
         "--host", "10.77.0.2", "--seed", "3"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        address = receiver.stdout.readline().strip()
        assert address.startswith("10.77.0.2:"), address
        sender = subprocess.run(
            ["ip", "netns", "exec", a, sys.executable, str(HERE / "kv_sender.py"), address,
             "--protocol", "tcp", "--requests", "8", "--seed", "3"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert sender.returncode == 0, sender.stderr[-3000:]
        assert sender.stdout.count('"committed": true') == 8, sender.stdout
        receiver.stdin.write(sender.stdout)
        receiver.stdin.close()
        assert receiver.stdout.readline().strip() == "verified 8"
    finally:
        receiver.kill()
        receiver.wait()
