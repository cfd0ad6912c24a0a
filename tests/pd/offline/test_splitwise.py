"""The seed's offline splitwise ``LLM`` (FastDeploy's keywords) with a real redis-server:
its two DP ranks register in the topic (role mixed), requests go through the cluster's
dispatcher and come back on the LLM's own result channel, equal to DP=1's and in
order; shutdown deregisters the ranks and stops their processes."""

from __future__ import annotations

import threading
import uuid

import pytest

from pd import LLM, SamplingParams
from scheduler.redis_server import EmbeddedRedis
from scheduler.registry import RegistryReader

PROMPTS = [f"prompt number {i}: {'word ' * i}" for i in range(16)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
OPTIONS = {"dtype": "float32", "max_model_len": 128, "seed": 0}


@pytest.fixture(scope="module")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


def test_offline_splitwise_matches_dp1(tiny_model, redis_server):
    model_dir = str(tiny_model("qwen2"))
    with LLM(model=model_dir, **OPTIONS) as single:
        expected = [o.outputs[0].token_ids for o in single.generate(PROMPTS, GREEDY)]
        expected_choices = [c.token_ids for c in single.generate(PROMPTS[0], SEEDED)[0].outputs]
    llm = LLM(
        model=model_dir,
        tensor_parallel_size=1,
        data_parallel_size=2,
        num_gpu_blocks_override=64,
        engine_worker_queue_port="0,0",
        enable_expert_parallel=True,
        scheduler_name="splitwise",
        scheduler_host="127.0.0.1",
        scheduler_port=redis_server.port,
        scheduler_topic=f"t{uuid.uuid4().hex[:8]}",
        scheduler_ttl=60,
        **OPTIONS,
    )
    registry = RegistryReader(llm.backend.scheduler)
    with llm:
        ranks = {rank.rank_id: rank.role for rank in registry.snapshot(max_age_s=0)}
        instance = llm.backend.instance_id
        assert ranks == {f"{instance}.dp0": "mixed", f"{instance}.dp1": "mixed"}

        outputs = llm.generate(PROMPTS, GREEDY)
        assert [o.prompt for o in outputs] == PROMPTS
        assert [o.outputs[0].token_ids for o in outputs] == expected
        counts = llm.requests_per_rank
        assert set(counts) == set(ranks) and sum(counts.values()) == len(PROMPTS)
        assert min(counts.values()) > 0  # the dispatcher's random pick among equals

        choices = llm.generate(PROMPTS[0], SEEDED)[0].outputs
        assert [c.token_ids for c in choices] == expected_choices

        before = llm.requests_per_rank
        with pytest.raises(ValueError, match=r"199 tokens.*max_model_len is 128"):
            llm.generate([PROMPTS[0], list(range(1, 200))], GREEDY)
        assert llm.requests_per_rank == before
        processes = llm.backend.ranks.processes
    assert not any(process.is_alive() for process in processes)
    assert registry.snapshot(max_age_s=0) == []  # deregistered
    registry.close()


def test_two_offline_llms_share_a_topic_without_mixing_requests(tiny_model, redis_server):
    """Each LLM numbers its requests from 0, as vLLM's does; in one topic, either's
    request may run on the other's rank, next to that LLM's request of the same number.
    Each must get its own tokens (and finish)."""
    model_dir = str(tiny_model("qwen2"))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompt_sets = [PROMPTS[:8], PROMPTS[8:]]
    with LLM(model=model_dir, **OPTIONS) as single:
        expected = [[o.outputs[0].token_ids for o in single.generate(p, params)]
                    for p in prompt_sets]  # fmt: skip
    topic = f"t{uuid.uuid4().hex[:8]}"
    cluster = {"scheduler_name": "splitwise", "scheduler_port": redis_server.port,
               "scheduler_topic": topic, "scheduler_ttl": 10}  # fmt: skip
    llms = [LLM(model=model_dir, num_gpu_blocks_override=64, **cluster, **OPTIONS)
            for _ in prompt_sets]  # fmt: skip
    try:
        got: list[object] = [None, None]

        def generate(index: int) -> None:
            try:
                outputs = llms[index].generate(prompt_sets[index], params)
                got[index] = [o.outputs[0].token_ids for o in outputs]
            except Exception as error:  # reported below
                got[index] = error

        threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert got == expected
        ranks = [set(llm.requests_per_rank) for llm in llms]
        assert ranks[0] | ranks[1] == {f"{llm.backend.instance_id}.dp0" for llm in llms}
    finally:
        for llm in llms:
            llm.shutdown()


def test_the_seeds_offline_snippet_on_a_tiny_ernie_moe(tiny_model, redis_server):
    """Seed 002's offline example as typed (model path and sizes aside): ERNIE-4.5-MoE,
    DP 2 with expert parallelism (the MoE group spans both ranks, which step in
    lockstep), registered in Redis; greedy tokens equal the single-rank LLM's."""
    model_dir = str(tiny_model("ernie4_5_moe"))
    with LLM(model=model_dir, **OPTIONS) as single:
        expected = [o.outputs[0].token_ids for o in single.generate(PROMPTS[:6], GREEDY)]
    with LLM(
        model=model_dir,
        tensor_parallel_size=1,
        data_parallel_size=2,
        max_model_len=128,
        num_gpu_blocks_override=64,
        engine_worker_queue_port="0,0",
        enable_expert_parallel=True,
        scheduler_name="splitwise",
        scheduler_host="127.0.0.1",
        scheduler_topic=f"t{uuid.uuid4().hex[:8]}",
        scheduler_port=redis_server.port,
        dtype="float32",
    ) as llm:
        outputs = llm.generate(PROMPTS[:6], GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
