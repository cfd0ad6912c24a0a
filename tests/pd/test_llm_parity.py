"""Greedy float32 outputs of ``LLM.generate`` equal HF transformers' on the same weights,
under plain batching, preemption, chunked prefill and prefix-cache hits."""

from __future__ import annotations

import pytest

from pd import LLM, SamplingParams
from tests.pd.hf_reference import hf_greedy

pytestmark = pytest.mark.slow  # the longest suite; CI runs it in its own step

MAX_NEW = 32
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "数据并行 splits requests over devices, 每个设备 runs its own batch.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time, in a small village by the sea, there lived an old fisherman "
    "who had never once caught a fish larger than his hand.",
    "1 2 3 4 5 6 7 8 9 10 11 12",
    "Café au lait, crème brûlée and a piñata 🎉",
    "Prefill and decode run on separate pools so that long prompts never stall streaming; "
    "the KV cache moves between them layer by layer while later layers still compute. "
    "This sentence is here to make the prompt long enough to span many blocks.",
    "a b",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def model_and_reference(request, tiny_model):
    model_dir = tiny_model(request.param)
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, seed=0)
    token_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    return model_dir, token_ids, hf_greedy(model_dir, token_ids, MAX_NEW), llm


def _assert_same(outputs, reference) -> None:
    for index, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
        assert out.outputs[0].token_ids == ref, f"prompt {index} differs from HF"
        assert out.outputs[0].finish_reason == "length"


def _assert_no_leak(llm: LLM) -> None:
    manager = llm.engine.block_manager
    manager.check_invariants(live=[])
    assert manager.num_free_blocks == manager.num_blocks


def test_batch_matches_hf(model_and_reference):
    _, token_ids, reference, llm = model_and_reference
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], GREEDY)
    _assert_same(outputs, reference)
    assert [o.prompt_token_ids for o in outputs] == token_ids
    _assert_no_leak(llm)


def test_string_prompts_are_tokenized_like_hf(model_and_reference):
    _, _, reference, llm = model_and_reference
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.prompt for o in outputs] == PROMPTS
    _assert_same(outputs, reference)


def test_preemption_keeps_outputs(model_and_reference):
    model_dir, token_ids, reference, _ = model_and_reference
    # 16 blocks of 4 tokens: one sequence of max_model_len fits, the batch does not.
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=64,
        block_size=4,
        num_gpu_blocks_override=16,
        enable_prefix_caching=False,
    )
    fitting = [(ids, ref) for ids, ref in zip(token_ids, reference, strict=True) if len(ids) <= 32]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids, _ in fitting], GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_same(outputs, [ref for _, ref in fitting])
    _assert_no_leak(llm)


def test_chunked_prefill_keeps_outputs(model_and_reference):
    model_dir, token_ids, reference, _ = model_and_reference
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=256, max_num_batched_tokens=7)
    assert max(len(ids) for ids in token_ids) > 7  # so some prompt needs several chunks
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], GREEDY)
    _assert_same(outputs, reference)
    _assert_no_leak(llm)


def test_prefix_cache_hits_keep_outputs(model_and_reference):
    model_dir, token_ids, _, llm = model_and_reference
    shared = token_ids[7]  # the longest prompt: many full blocks
    prompts = [shared + ids for ids in token_ids[:8]]
    reference = hf_greedy(model_dir, prompts, MAX_NEW)
    manager = llm.engine.block_manager
    hits_before = manager.num_prefix_hit_tokens
    llm.generate([{"prompt_token_ids": shared}], GREEDY)  # warm the cache
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], GREEDY)
    num_full_blocks = len(shared) // manager.block_size
    assert manager.num_prefix_hit_tokens - hits_before >= 8 * num_full_blocks * manager.block_size
    assert all(o.num_cached_tokens >= num_full_blocks * manager.block_size for o in outputs)
    _assert_same(outputs, reference)
    _assert_no_leak(llm)


@pytest.mark.parametrize(
    "variant",
    [
        {"arch": "llama", "rope_scaling": "llama3"},
        {"arch": "llama", "rope_scaling": "linear"},
        {"arch": "qwen3", "tie_word_embeddings": True},
        {"arch": "qwen2", "num_shards": 2},
    ],
    ids=["llama3-rope", "linear-rope", "tied", "sharded"],
)
def test_model_variants_match_hf(tiny_model, variant):
    model_dir = tiny_model(**variant)
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512)
    long_prompt = llm.tokenizer.encode(PROMPTS[7] + " " + PROMPTS[4] + " " + PROMPTS[7])
    token_ids = [llm.tokenizer.encode(p) for p in PROMPTS[:3]] + [long_prompt]
    assert len(long_prompt) > 256  # past llama3's original_max_position_embeddings
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in token_ids], GREEDY)
    _assert_same(outputs, hf_greedy(model_dir, token_ids, MAX_NEW))
    _assert_no_leak(llm)
