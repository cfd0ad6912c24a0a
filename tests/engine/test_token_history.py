"""The worker's device-side token history gives the same penalty inputs as building
them from the token lists, across fills, recorded tokens and reused rows."""

from __future__ import annotations

import random

import torch

from engine.sampler import PenaltyTensors, apply_penalties
from engine.sampling_params import SamplingParams
from engine.token_history import TokenHistory

VOCAB = 50


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # no penalty: its row is never filled
        SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5),
    ]


def test_history_matches_the_lists_after_fills_and_recorded_tokens() -> None:
    rng = random.Random(0)
    params = _params()
    rows = [5, 0, 3, 9]  # batch rows, in any order
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))] for _ in params]
    outputs = [[rng.randrange(VOCAB) for _ in range(rng.randrange(0, 5))] for _ in params]
    history = TokenHistory(VOCAB, torch.device("cpu"))
    history.fill(rows[2], [1, 2, 3], [4])  # an earlier request's leftovers in a reused row
    for row, p, prompt, output in zip(rows, params, prompts, outputs, strict=True):
        if p.has_penalties:
            history.fill(row, prompt, output)
    for _ in range(6):  # sampled tokens, recorded for rows with a penalty
        tokens = [rng.randrange(VOCAB) for _ in params]
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        history.record(
            torch.tensor([rows[i] for i in penalized]), torch.tensor([tokens[i] for i in penalized])
        )
        for output, token in zip(outputs, tokens, strict=True):
            output.append(token)
    from_history = history.penalties(params, rows)
    from_lists = PenaltyTensors.build(params, prompts, outputs, VOCAB, torch.device("cpu"))
    assert from_history is not None and from_lists is not None
    logits = torch.randn(len(params), VOCAB)
    torch.testing.assert_close(
        apply_penalties(logits, from_history), apply_penalties(logits, from_lists), rtol=0, atol=0
    )


def test_no_penalty_no_tensors() -> None:
    history = TokenHistory(VOCAB, torch.device("cpu"))
    assert history.penalties([SamplingParams(), SamplingParams(min_tokens=3)], [0, 1]) is None
    assert history.seen is None  # nothing allocated
