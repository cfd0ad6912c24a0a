"""The seed's disaggregated MoE layout at small scale: a prefill instance and a decode
instance of ERNIE-4.5-MoE, each DP 2 with expert parallelism (each instance's MoE group
spans its two ranks, which step in lockstep), over Redis: greedy tokens equal the
offline engine's, every rank of both instances takes work, and every KV block is free
again afterwards."""

from __future__ import annotations

import asyncio

import pytest

from pd import LLM, SamplingParams
from tests.cluster.cluster import Cluster, wait_blocks_free, wait_both_ranks_took_work
from tests.cluster.test_pd_parity import MAX_TOKENS, complete_all, prompts


@pytest.mark.slow
def test_dp2_ep_prefill_and_decode_equal_offline(make_cluster, tiny_model):
    model_dir = tiny_model("ernie4_5_moe")
    texts = prompts(16, seed=5)
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=256, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(texts, params)]
    llm.shutdown()

    cluster: Cluster = make_cluster()
    layout = ("--data-parallel-size", "2", "--enable-expert-parallel")
    prefill = cluster.start("prefill", *layout, model_dir=model_dir)
    decode = cluster.start("decode", *layout, model_dir=model_dir)
    assert asyncio.run(complete_all([prefill.base_url, decode.base_url], texts)) == expected
    wait_both_ranks_took_work([prefill, decode], len(texts))
    wait_blocks_free([prefill, decode])
