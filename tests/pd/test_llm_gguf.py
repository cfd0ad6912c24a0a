"""GGUF checkpoints through ``LLM``: greedy float32 tokens identical to HF transformers
loading the same GGUF file (which dequantizes and un-permutes it independently of us),
for a tiny quantized Llama and for the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch

from engine.tokenizer import encode_chat, load_tokenizer
from pd import LLM, SamplingParams
from tests.pd.hf_reference import hf_greedy
from tests.pd.real_model import MAX_TOKENS, QUESTIONS, messages, offline_answers, smollm2_path

pytestmark = pytest.mark.slow  # each loads a model twice (ours and transformers')

TINY_PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog", "1 2 3 4 5 6", "a b"]


def test_tiny_quantized_llama_matches_transformers(tiny_gguf):
    gguf_file = tiny_gguf("llama", "Q4_1")
    llm = LLM(model=str(gguf_file), dtype="float32", max_model_len=256, device="cpu")
    prompts = [llm.tokenizer.encode(p, add_special_tokens=False) for p in TINY_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    reference = hf_greedy(gguf_file, prompts, max_new_tokens=16)
    assert [o.outputs[0].token_ids for o in outputs] == reference


def test_smollm2_chat_answers_match_transformers():
    gguf_file = smollm2_path()
    answers = offline_answers()
    # NOTE: tokenization equals transformers' GGUF tokenizer (tests/engine/test_gguf_metadata.py)
    tokenizer = load_tokenizer(gguf_file)
    prompts = [encode_chat(tokenizer, messages(q))[1] for q in QUESTIONS]
    eos = tokenizer.eos_token_id
    reference = hf_greedy(gguf_file, prompts, MAX_TOKENS, torch.float32, eos_token_id=eos)
    assert [list(ids) for ids, _ in answers] == reference
    assert sum(ids[-1] == eos for ids, _ in answers) >= 3  # several answers end by themselves
    capital = answers[QUESTIONS.index("What is the capital of France?")][1]
    assert "Paris" in capital
