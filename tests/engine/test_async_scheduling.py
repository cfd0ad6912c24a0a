"""Async scheduling (step N+1 submitted before step N's tokens are read back) gives the
same outputs as stepping synchronously, through every rule that ends or shapes a
sequence: preemption, chunked prefill, prefix hits, eos, stop ids and strings,
max_tokens, n > 1, seeded sampling, penalties and logprobs."""

from __future__ import annotations

import pytest

from pd import LLM, SamplingParams
from tests.engine import backend_parity

pytestmark = pytest.mark.slow


def _generate(llm: LLM, token_ids: list[list[int]], params: list[SamplingParams]):
    return llm.generate([{"prompt_token_ids": ids} for ids in token_ids], params)


def _mixed_params(eos_token_id: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=24),  # eos ends it where it comes
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[eos_token_id + 5]),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=16, repetition_penalty=1.6, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=20, stop=["e"], ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.0, max_tokens=18, min_tokens=6),
    ]


def test_async_scheduling_matches_sync(tiny_model):
    model_dir = tiny_model("llama")
    kwargs = backend_parity.engine_kwargs(model_dir, "cpu", "float32")
    token_ids = backend_parity.prompts(vocab_size=500)
    results = {}
    for mode in (False, True):
        llm = LLM(async_scheduling=mode, **kwargs)
        params = _mixed_params(llm.config.model.eos_token_ids[0])
        first = _generate(llm, token_ids, params)
        second = _generate(llm, token_ids[::-1], params)  # prefix hits, other neighbours
        results[mode] = [
            [(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in o.outputs]
            for o in first + second
        ]
        assert llm.engine.scheduler.num_preemptions > 0
        while llm.engine.has_unfinished():  # the last submitted step's wasted rows
            llm.engine.step()
        manager = llm.engine.block_manager
        manager.check_invariants(live=[])
        assert manager.num_free_blocks == manager.num_blocks
    # Tokens, text and finish reasons are identical; logprobs to float noise (a row's
    # matmul on the CPU may round differently in a batch of another size).
    for got, want in zip(results[True], results[False], strict=True):
        assert [c[:3] for c in got] == [c[:3] for c in want]
        for (*_, got_logprobs), (*_, want_logprobs) in zip(got, want, strict=True):
            assert _logprob_values(got_logprobs) == pytest.approx(
                _logprob_values(want_logprobs), abs=1e-4
            )


def _logprob_values(logprobs) -> list[float]:
    return [lp.logprob for step in logprobs or [] for lp in step.values()]
