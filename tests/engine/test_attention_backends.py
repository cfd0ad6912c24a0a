"""The triton backend (in Triton's interpreter on CPU) gives the sdpa reference's
greedy float32 tokens through the whole engine: chunked prefill, prefix hits,
preemption."""

from __future__ import annotations

import pytest

from pd import LLM
from tests.engine import backend_parity

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_triton_backend_matches_sdpa_on_cpu(tiny_model, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model_dir = tiny_model("llama")
    kwargs = backend_parity.engine_kwargs(model_dir, "cpu", "float32")
    token_ids = backend_parity.prompts(vocab_size=500, num=10)
    outputs = {}
    for backend in ("sdpa", "triton"):
        llm = LLM(attention_backend=backend, **kwargs)
        outputs[backend] = backend_parity.run(llm, token_ids, max_tokens=6)
        assert llm.engine.scheduler.num_preemptions > 0
        manager = llm.engine.block_manager
        assert manager.num_free_blocks == manager.num_blocks
    assert [o.token_ids for o in outputs["triton"]] == [o.token_ids for o in outputs["sdpa"]]
