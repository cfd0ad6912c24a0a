"""Start a real ``pd-serve`` process (or ``pd-serve cluster``) for tests and stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from pd.args import pick_free_port

_READY_TIMEOUT_S = 120.0


def child_pids(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def spawned_children(pid: int) -> list[int]:
    """``pid``'s children started by multiprocessing's spawn (an API server's engine, an
    engine's TP workers), not its resource tracker, which is a child too."""
    return [
        child
        for child in child_pids(pid)
        if b"multiprocessing.spawn" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of a metric from /metrics (labels: e.g. 'finished_reason="abort"');
        the first, when several match (e.g. one per DP rank)."""
        return self.metric_samples(name, labels)[0]

    def metric_samples(self, name: str, labels: str = "") -> list[float]:
        """Every sample of a metric whose labels contain ``labels``, in /metrics order."""
        text = httpx.get(f"{self.root_url}/metrics", timeout=10).text
        found = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and labels in line
        ]
        if not found:
            raise KeyError(f"{name}{{{labels}}} not in /metrics")
        return found

    def engine_pid(self) -> int:
        pids = spawned_children(self.process.pid)
        if not pids:
            raise RuntimeError(f"no engine child of {self.process.pid}")
        return pids[0]

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    model_dir: Path,
    log_path: Path,
    *extra: str,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> ServerProcess:
    """Start ``pd-serve`` on CPU (``env``: its environment, default this one's) and wait
    until it is ready."""
    port = port or pick_free_port()
    command = [
        sys.executable, "-m", "pd.serve",
        "--model", str(model_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--device", "cpu",
        "--dtype", "float32",
        "--max-model-len", "256",
        *extra,
    ]  # fmt: skip
    return start_command(command, log_path, port, env)


class ClusterLauncher:
    """``pd-serve cluster`` with ``flags``, its output read line by line as it comes."""

    def __init__(self, flags: list[str], env: Mapping[str, str] | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pd.serve", "cluster", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ if env is None else env, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        self.lines: list[str] = []

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def read_until(self, text: str, timeout_s: float) -> str:
        """Read until a line contains ``text`` (the launcher must keep running); that line."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert time.monotonic() < deadline and self.process.poll() is None, self.output
            self.lines.append(self.process.stdout.readline())  # type: ignore[union-attr]
            if text in self.lines[-1]:
                return self.lines[-1]

    def url(self, name: str) -> str:
        """The URL printed on the line that starts with ``name`` ("OpenAI base URL",
        "router", "prefill", ...)."""
        return next(line.split()[-1] for line in self.lines if line.strip().startswith(name))

    def children(self) -> list[int]:
        return child_pids(self.process.pid)

    def interrupt(self, timeout_s: float = 60) -> int:
        """Ctrl-C, as a user stops it; its exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout_s)


def start_command(
    command: list[str],
    log_path: Path,
    port: int,
    env: Mapping[str, str] | None = None,
    ready_text: str = "pd-serve ready",
) -> ServerProcess:
    """Run ``command`` (a ``pd-serve`` whose API port is ``port``, or a launcher of
    several, or a ``pd-router``) and wait until it says ``ready_text``."""
    log = log_path.open("w")
    full_env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(process, port, log_path)
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[2]} exited with {process.returncode}:\n{server.log()}")
        if ready_text in server.log():
            return server
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"pd-serve was not ready in {_READY_TIMEOUT_S} s:\n{server.log()}")


@dataclass
class BackgroundStream:
    """A long streamed completion on a thread, for tests that kill something under it:
    ``chunks`` it received, ``errors`` it ended with."""

    thread: threading.Thread
    chunks: list[str]
    errors: list[BaseException]

    def wait_end(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"


def stream_in_background(client, model: str, prompt: str, max_tokens: int) -> BackgroundStream:  # type: ignore[no-untyped-def]
    """Start a greedy ``ignore_eos`` stream and return once its first chunk arrived (or
    after 30 s)."""
    chunks: list[str] = []
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            for chunk in client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            ):  # fmt: skip
                chunks.append(chunk.choices[0].text)
        except Exception as error:  # the failure is what the caller checks
            errors.append(error)

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 30
    while not chunks and time.monotonic() < deadline:
        time.sleep(0.01)
    return BackgroundStream(thread, chunks, errors)
