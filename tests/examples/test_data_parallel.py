"""examples/data_parallel.py runs to completion on CPU: one process per DP rank, each an
``LLM(data_parallel_rank=r)`` with its own prompts, meeting the other in the DP group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_two_dp_ranks_run_their_prompts(tiny_model):
    command = [
        sys.executable, "examples/data_parallel.py", "--model", str(tiny_model("llama")),
        "--dp-size", "2", "--tp-size", "1", "--num-prompts", "8", "--device", "cpu",
    ]  # fmt: skip
    # This checkout's packages, whatever the interpreter has installed.
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    for rank in (0, 1):
        assert f"DP rank {rank} needs to process 4 prompts" in done.stdout, log
        assert done.stdout.count(f"DP rank {rank}, Prompt:") == 4, log
    assert "Traceback" not in log
