"""MoE models over DP ranks (gloo, real engine processes): the MoE group spans every
DP x TP rank, tokens travel to their experts and back, and the ranks step in lockstep.

- ``LLM(data_parallel_size=2)`` with experts split over the ranks or whole experts per
  rank (``enable_expert_parallel``) gives HF transformers' greedy float32 tokens, for
  each architecture, with chunked prefill and preemption; also DP 2 x TP 2.
  (ERNIE with expert parallelism over DP ranks: tests/pd/offline/test_splitwise.py,
  tests/cluster/test_moe_cluster.py and the pd-serve test below.)
- ``pd-serve --data-parallel-size 2 --enable-expert-parallel``: one request reaches one
  rank, the other runs dummy batches (counted in /metrics) and the answer is HF's; the
  routing counts reach /metrics; a killed rank ends the other's request with a clear
  error within seconds, and the instance exits 1.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from pd import LLM
from tests.pd.hf_reference import hf_greedy
from tests.pd.server_process import start_server, stream_in_background
from tests.pd.test_moe_models import stress_prompts
from tests.pd.test_tensor_parallel import GREEDY, MAX_NEW, PROMPTS

# The dispatch is the same code for every architecture: each layout runs on one model
# in the fast step, and expert parallelism on the two others (their own expert loading,
# per-expert or stacked, split by whole experts over the DP ranks) in the slow one.
FAST = {("qwen3_moe", True), ("ernie4_5_moe", False)}
CASES = [
    pytest.param(arch, ep, marks=() if (arch, ep) in FAST else pytest.mark.slow)
    for arch, ep in (*sorted(FAST), ("mixtral", True), ("granitemoe", True))
]


def generate_dp(model_dir: Path, token_ids: list[list[int]], **kwargs) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Small pools and a 16-token budget per rank: chunked prefill and preemption."""
    with LLM(
        model=str(model_dir), dtype="float32", max_model_len=64, block_size=4,
        num_gpu_blocks_override=18, max_num_batched_tokens=16, data_parallel_size=2,
        **kwargs,
    ) as llm:  # fmt: skip
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], GREEDY)
        assert all(count > 0 for count in llm.requests_per_rank.values())
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize(("arch", "expert_parallel"), CASES)
def test_dp2_moe_matches_hf(tiny_model, arch: str, expert_parallel: bool):
    model_dir = tiny_model(arch)
    token_ids = stress_prompts(model_dir)
    reference = hf_greedy(model_dir, token_ids, MAX_NEW)
    got = generate_dp(model_dir, token_ids, enable_expert_parallel=expert_parallel)
    assert got == reference


@pytest.mark.slow
def test_dp2_tp2_expert_parallel_matches_hf(tiny_model):
    """Four ranks in the MoE group: two DP ranks of two TP ranks each."""
    model_dir = tiny_model("qwen3_moe")
    token_ids = stress_prompts(model_dir)
    reference = hf_greedy(model_dir, token_ids, MAX_NEW)
    got = generate_dp(model_dir, token_ids, tensor_parallel_size=2, enable_expert_parallel=True)
    assert got == reference


def rank_values(root_url: str, name: str) -> dict[str, float]:
    """dp_rank -> value of ``name`` (summed over its other labels)."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{root_url}/metrics", timeout=10).text.splitlines():
        match = re.match(rf'{re.escape(name)}{{.*dp_rank="(\d+)".*}} (\S+)$', line)
        if match:
            values[match[1]] = values.get(match[1], 0.0) + float(match[2])
    return values


def test_serve_dp2_expert_parallel_lockstep_then_a_killed_rank(tiny_model, tmp_path):
    model_dir = tiny_model("ernie4_5_moe")
    server = start_server(
        model_dir, tmp_path / "server.log", "--data-parallel-size", "2",
        "--enable-expert-parallel", "--max-model-len", "512",
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        prompt_ids = stress_prompts(model_dir)[1]
        reply = client.completions.create(
            model=model, prompt=prompt_ids, max_tokens=MAX_NEW, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        expected = hf_greedy(model_dir, [prompt_ids], MAX_NEW)[0]
        assert reply.choices[0].text == decode(model_dir, expected)
        deadline = time.monotonic() + 5  # stats come every 100 ms
        while True:
            taken = rank_values(server.root_url, "pd:dp_rank_requests_total")
            dummy = rank_values(server.root_url, "pd:dp_dummy_steps_total")
            routed = rank_values(server.root_url, "pd:moe_expert_tokens_total")
            idle = [rank for rank, count in taken.items() if count == 0]
            if len(idle) == 1 and dummy.get(idle[0], 0) > 0 and sum(routed.values()) > 0:
                break
            assert time.monotonic() < deadline, (taken, dummy, routed)
            time.sleep(0.1)
        assert dummy[idle[0]] >= MAX_NEW - 1  # the idle rank ran every step with the busy one

        # A long stream on the busy rank; killing the idle rank ends it.
        stream = stream_in_background(client, model, PROMPTS[0], 480)
        running = rank_values(server.root_url, "pd:num_requests_running")
        busy = [rank for rank, count in running.items() if count]
        victim = next(r for r in ("0", "1") if r not in busy)
        engine_pid = engine_pids(server.log())[int(victim)]
        killed_at = time.monotonic()
        subprocess.run(["kill", "-9", str(engine_pid)], check=True)
        stream.wait_end(30)
        assert time.monotonic() - killed_at < 20
        assert stream.errors and "another DP rank of its MoE group died" in str(stream.errors[0])
        assert server.process.wait(30) == 1
        assert "a DP rank of this MoE group is gone" in server.log()
    finally:
        server.stop()


def engine_pids(log: str) -> dict[int, int]:
    found = re.findall(r"engine core \(DP rank (\d+)\) pid (\d+)", log)
    return {int(rank): int(pid) for rank, pid in found}


def decode(model_dir: Path, token_ids: list[int]) -> str:
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(str(model_dir)).decode(token_ids, skip_special_tokens=True)
