"""The MoE architectures (Qwen3-MoE, Mixtral, GraniteMoE, ERNIE-4.5-MoE): greedy float32
tokens of ``LLM.generate`` equal HF transformers' on the same tiny checkpoint, through a
batch that preempts, prefills in chunks and hits the prefix cache; on one process, and
over two TP ranks (gloo, real worker processes) with each expert split over them or
with whole experts split over them (``enable_expert_parallel``); and through
``pd-serve --tensor-parallel-size 2 --enable-expert-parallel``."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.tokenizer import load_tokenizer
from tests.pd.hf_reference import hf_greedy
from tests.pd.server_process import start_server
from tests.pd.test_tensor_parallel import (
    GREEDY,
    MAX_NEW,
    PROMPTS,
    check_answers_match_hf,
    stress_llm,
)

ARCHS = ["qwen3_moe", "mixtral", "granitemoe", "ernie4_5_moe"]


def stress_prompts(model_dir: Path) -> list[list[int]]:
    """As tests/pd/test_tensor_parallel.py's batch: some prompts share a prefix, some
    take several chunks of the 16-token budget."""
    tokenizer = load_tokenizer(str(model_dir))
    token_ids = [tokenizer.encode(p) for p in PROMPTS]
    token_ids += [token_ids[3] + ids[:4] for ids in token_ids[:4]]
    token_ids = [ids for ids in token_ids if len(ids) <= 64 - MAX_NEW]
    assert max(len(ids) for ids in token_ids) > 16  # some prompt takes several chunks
    return token_ids


@pytest.fixture(scope="module", params=ARCHS)
def moe_case(request, tiny_model) -> tuple[Path, list[list[int]], list[list[int]]]:
    model_dir = tiny_model(request.param)
    token_ids = stress_prompts(model_dir)
    return model_dir, token_ids, hf_greedy(model_dir, token_ids, MAX_NEW)


def check_stress_batch(model_dir: Path, token_ids, reference, **llm_kwargs) -> None:  # type: ignore[no-untyped-def]
    with stress_llm(model_dir, **llm_kwargs) as llm:
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], GREEDY)
        assert [o.outputs[0].token_ids for o in outputs] == reference
        engine = llm.engine
        assert engine.scheduler.num_preemptions > 0
        assert engine.block_manager.num_prefix_hit_tokens > 0
        engine.block_manager.check_invariants(live=[])
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_moe_matches_hf(moe_case):
    check_stress_batch(*moe_case)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp-experts", "ep"])
def test_moe_tp2_matches_hf(moe_case, expert_parallel):
    check_stress_batch(*moe_case, tensor_parallel_size=2, enable_expert_parallel=expert_parallel)


def test_serve_tp2_expert_parallel_matches_hf(tiny_model, tmp_path):
    model_dir = tiny_model("ernie4_5_moe")
    server = start_server(
        model_dir, tmp_path / "server.log", "--tensor-parallel-size", "2",
        "--enable-expert-parallel", "--max-model-len", "512",
    )  # fmt: skip
    try:
        check_answers_match_hf(server, model_dir)
        assert "MoE over 2 rank(s): 4 whole experts of 8 per rank" in server.log()
    finally:
        assert server.stop() == 0, server.log()
