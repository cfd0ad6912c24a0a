"""How many torch threads each process of a ``pd-serve`` instance runs on CPU.

Torch's default is one OpenMP thread per core, and torch's OpenMP (GNU libgomp) spins
for about 3 ms after each parallel region before its threads sleep. An engine process
that shares its cores with its API server, other ranks or a load generator then waits
at every region for a thread that is not running: on 2 cores with pd-bench beside it, a
decode step of a 30M-parameter model took ~600 ms instead of ~20 ms. So:

- the API server runs one torch thread (it never runs the model);
- an engine process gets the cores left after the API servers, shared among the
  engine processes on those cores (at least one), and its OpenMP threads sleep when
  idle (``OMP_WAIT_POLICY=PASSIVE``, set before torch loads OpenMP);
- ``--engine-threads N`` wins, then ``OMP_NUM_THREADS``; a wait policy the user set
  (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``KMP_BLOCKTIME``) is kept;
- the offline ``LLM`` keeps torch's defaults for an engine in its own process
  (``torch.set_num_threads`` to change them); its DP engine processes choose as these.

Standard library only at import: the engine process must set the wait policy before
anything imports torch.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

API_SERVER_THREADS = 1
WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadChoice:
    """The torch thread count of one engine process, where it came from and why."""

    num_threads: int
    source: str  # "flag" (--engine-threads), "env" (OMP_NUM_THREADS) or "auto"
    reason: str


def choose_engine_threads(
    num_cores: int,
    num_engines: int = 1,
    num_api_servers: int = 1,
    requested: int = 0,
    omp_num_threads: str | None = None,
) -> ThreadChoice:
    """Threads per engine process: ``requested`` (``--engine-threads``; 0 is auto) wins,
    then a valid ``OMP_NUM_THREADS``; else each API server keeps one of ``num_cores``
    and the ``num_engines`` engine processes share the rest, at least one thread each."""
    if requested < 0:
        raise ValueError(f"requested threads must be >= 0, got {requested}")
    if num_cores < 1 or num_engines < 1 or num_api_servers < 0:
        raise ValueError(
            f"need num_cores >= 1, num_engines >= 1, num_api_servers >= 0; got "
            f"{num_cores}, {num_engines}, {num_api_servers}"
        )
    if requested:
        return ThreadChoice(requested, "flag", f"--engine-threads {requested}")
    from_env = parse_omp_num_threads(omp_num_threads)
    if from_env is not None:
        return ThreadChoice(from_env, "env", f"OMP_NUM_THREADS={omp_num_threads}")
    share = max(1, (num_cores - num_api_servers) // num_engines)
    reason = (
        f"auto: {_plural(num_cores, 'core')}, {_plural(num_api_servers, 'API server')} "
        f"and {_plural(num_engines, 'engine process', 'engine processes')} on them"
    )
    return ThreadChoice(share, "auto", reason)


def parse_omp_num_threads(value: str | None) -> int | None:
    """The thread count OpenMP takes from ``OMP_NUM_THREADS`` (the first entry of a
    nesting list such as "4,2"), or None when unset or not a positive integer."""
    if value is None:
        return None
    first = value.split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def parse_cpu_max(text: str) -> float | None:
    """Cores allowed by a cgroup v2 ``cpu.max`` ("QUOTA PERIOD"); None for "max"."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = float(fields[1]) if len(fields) > 1 else 100_000.0
    return float(fields[0]) / period


def usable_cores(cgroup_root: Path = _CGROUP_ROOT) -> int:
    """Cores this process may run on: its CPU affinity, capped by the tightest cgroup v2
    CPU quota on its cgroup and the cgroups above it (rounded down, at least one)."""
    try:
        num_cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        num_cores = os.cpu_count() or 1
    limits = [parse_cpu_max(text) for text in _cpu_max_files(cgroup_root)]
    quotas = [limit for limit in limits if limit is not None]
    if quotas:
        num_cores = min(num_cores, max(1, math.floor(min(quotas))))
    return num_cores


def _cpu_max_files(cgroup_root: Path) -> list[str]:
    """The ``cpu.max`` texts from this process's cgroup up to the root (those present)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    own = next((line[3:] for line in lines if line.startswith("0::")), "/")
    folder = cgroup_root / own.strip("/")
    texts = []
    for path in [folder, *folder.parents]:
        if not path.is_relative_to(cgroup_root):
            break
        try:
            texts.append((path / "cpu.max").read_text())
        except OSError:
            continue
    return texts


def engine_thread_choice(requested: int, num_engines: int, num_api_servers: int) -> ThreadChoice:
    """``choose_engine_threads`` for this machine and this process's environment."""
    return choose_engine_threads(
        usable_cores(),
        num_engines=num_engines,
        num_api_servers=num_api_servers,
        requested=requested,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )


def apply_engine_threads(
    choice: ThreadChoice, environ: MutableMapping[str, str] = os.environ
) -> str:
    """In an engine process: make OpenMP threads sleep when idle (unless the user chose
    a wait policy), then set torch's thread count; returns the line to log.

    NOTE: OpenMP reads its environment once, when torch loads it, so this must run
    before anything in the process imports torch. ``OMP_NUM_THREADS`` is set too: it is
    the default of every thread (``torch.set_num_threads`` sets the calling thread's and
    MKL's), and without it importing torch starts a worker per core.
    """
    waiting = _set_passive_wait(environ)
    if choice.source != "env":
        environ["OMP_NUM_THREADS"] = str(choice.num_threads)
    import torch

    torch.set_num_threads(choice.num_threads)
    num_threads = torch.get_num_threads()
    return f"{_plural(num_threads, 'torch thread')} ({choice.reason}); {waiting}"


def _set_passive_wait(environ: MutableMapping[str, str]) -> str:
    chosen = [f"{name}={environ[name]}" for name in WAIT_POLICY_VARS if name in environ]
    if chosen:
        return f"OpenMP waits as set: {', '.join(chosen)}"
    if "torch" in sys.modules:
        return "OpenMP may spin when idle: torch was loaded before OMP_WAIT_POLICY could be set"
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE)"


def apply_api_server_threads() -> str:
    """In an API server process: one torch thread; returns the line to log."""
    import torch

    torch.set_num_threads(API_SERVER_THREADS)
    return f"API server: {_plural(torch.get_num_threads(), 'torch thread')}"


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
