"""One workload that exercises every attention path, for comparing backends and
execution modes: prompts of mixed lengths (one spans many blocks), chunked prefill
(a small token budget), prefix-cache hits (prompts sharing a long prefix) and
preemption (too few KV blocks for every sequence at once)."""

from __future__ import annotations

import random

from pd import LLM, SamplingParams

SHARED_PREFIX = list(range(3, 67))  # four blocks of 16 tokens


def prompts(vocab_size: int, num: int = 10, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 17, 40, 90, 5, 33, 64, 2, 70][:num]
    out = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]
    out[4] = SHARED_PREFIX + out[4][:20]  # prefix hits once the first of them is cached
    out[7] = SHARED_PREFIX + out[7][:9]
    return out


def run(llm: LLM, token_ids: list[list[int]], max_tokens: int, logprobs: int | None = None):
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs
    )
    # Two waves: the second's shared prefixes hit blocks the first cached.
    first = llm.generate([{"prompt_token_ids": ids} for ids in token_ids[:4]], params)
    second = llm.generate([{"prompt_token_ids": ids} for ids in token_ids[4:]], params)
    return [o.outputs[0] for o in first + second]


def engine_kwargs(model_dir, device: str, dtype: str) -> dict:
    """Chunked prefill (budget 32) and preemption (blocks for one max_model_len sequence)."""
    return dict(
        model=str(model_dir),
        device=device,
        dtype=dtype,
        max_model_len=256,
        max_num_batched_tokens=32,
        num_gpu_blocks_override=16,
        block_size=16,
        seed=0,
    )
