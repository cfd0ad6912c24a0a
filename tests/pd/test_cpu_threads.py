"""The CPU thread policy: the pure choice, the machine's cores, and what OpenMP takes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pd.cpu_threads import (
    ThreadChoice,
    choose_engine_threads,
    parse_cpu_max,
    parse_omp_num_threads,
    usable_cores,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("num_cores", "num_engines", "num_api_servers", "expected"),
    [
        (2, 1, 1, 1),  # the 2-core machine: the API server keeps one core
        (1, 1, 1, 1),  # never fewer than one
        (16, 1, 1, 15),
        (16, 2, 2, 7),  # two instances of `pd-serve cluster`
        (2, 2, 2, 1),
        (8, 3, 1, 2),  # one API server, three local ranks
    ],
)
def test_auto_leaves_the_api_servers_a_core_and_shares_the_rest(
    num_cores: int, num_engines: int, num_api_servers: int, expected: int
):
    choice = choose_engine_threads(num_cores, num_engines, num_api_servers)
    assert choice.num_threads == expected
    assert choice.source == "auto"
    assert f"{num_cores} core" in choice.reason


def test_the_flag_wins_over_omp_num_threads_and_the_cores():
    choice = choose_engine_threads(2, requested=6, omp_num_threads="3")
    assert choice == ThreadChoice(6, "flag", "--engine-threads 6")


def test_omp_num_threads_wins_over_auto():
    choice = choose_engine_threads(64, omp_num_threads="4")
    assert (choice.num_threads, choice.source) == (4, "env")
    assert "OMP_NUM_THREADS=4" in choice.reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("1", 1), (" 8 ", 8), ("4,2", 4), ("0", None), ("", None), ("two", None)],
)
def test_omp_num_threads_parses_as_openmp_reads_it(value: str | None, expected: int | None):
    assert parse_omp_num_threads(value) == expected


def test_an_invalid_omp_num_threads_falls_back_to_auto():
    assert choose_engine_threads(4, omp_num_threads="lots").source == "auto"


def test_nonsense_counts_are_refused():
    with pytest.raises(ValueError, match="requested threads"):
        choose_engine_threads(2, requested=-1)
    with pytest.raises(ValueError, match="num_cores >= 1"):
        choose_engine_threads(0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5), ("", None)],
)
def test_cpu_max_is_read_in_cores(text: str, expected: float | None):
    assert parse_cpu_max(text) == expected


def test_a_cgroup_quota_caps_the_affinity(tmp_path: Path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == affinity  # no cpu.max anywhere
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core: still one thread
    assert usable_cores(tmp_path) == 1


def _omp_display(env: dict[str, str]) -> str:
    """What libgomp says it read, when torch is imported after the engine's set-up."""
    code = (
        "from pd.cpu_threads import ThreadChoice, apply_engine_threads\n"
        "print(apply_engine_threads(ThreadChoice(2, 'flag', 'test')))\n"
        "import torch; torch.ones(1 << 20).sum()\n"
    )
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    full_env.update(env, OMP_DISPLAY_ENV="VERBOSE")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    if "GOMP_SPINCOUNT" not in result.stderr + result.stdout:
        pytest.skip("torch's OpenMP is not GNU libgomp (no GOMP_SPINCOUNT displayed)")
    return result.stdout + result.stderr


def test_an_engine_process_makes_openmp_sleep_when_idle():
    output = _omp_display({})
    assert "GOMP_SPINCOUNT = '0'" in output  # libgomp's default spins 300000 times
    assert "OMP_NUM_THREADS = '2'" in output  # every thread's default, not only torch's
    assert "2 torch threads (test); OpenMP threads sleep when idle" in output


def test_a_wait_policy_the_user_set_is_kept():
    output = _omp_display({"OMP_WAIT_POLICY": "ACTIVE"})
    assert "GOMP_SPINCOUNT = '0'" not in output
    assert "OpenMP waits as set: OMP_WAIT_POLICY=ACTIVE" in output


def test_the_cluster_divides_the_cores_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch):
    from pd.cluster import _engine_threads_args

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = choose_engine_threads(usable_cores(), num_engines=3, num_api_servers=3).num_threads
    assert _engine_threads_args(3, ["--max-num-seqs", "8"]) == ["--engine-threads", str(share)]
    assert _engine_threads_args(3, ["--engine-threads", "2"]) == []
    assert _engine_threads_args(3, ["--engine-threads=2"]) == []
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert _engine_threads_args(3, []) == []
