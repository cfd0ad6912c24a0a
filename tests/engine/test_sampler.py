from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine.outputs import Logprob
from engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    apply_penalties,
    make_generator,
    to_token_logprobs,
)
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB = 16
# A crafted distribution over 8 tokens, sorted by probability (sums to 1).
CRAFTED_PROBS = [0.30, 0.22, 0.16, 0.12, 0.08, 0.06, 0.04, 0.02]


def build_batch(
    params: list[SamplingParams],
    vocab_size: int = VOCAB,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    generators: list[torch.Generator | None] | None = None,
) -> SamplingBatch:
    num_rows = len(params)
    return SamplingBatch.build(
        params,
        prompts or [[] for _ in range(num_rows)],
        outputs or [[] for _ in range(num_rows)],
        generators or [None] * num_rows,
        vocab_size,
        CPU,
    )


def random_logits(num_rows: int, vocab_size: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3


def crafted_logits(num_rows: int) -> torch.Tensor:
    return torch.tensor(CRAFTED_PROBS).log().expand(num_rows, -1).contiguous()


def draw(
    logits: torch.Tensor,
    params: SamplingParams,
    seed: int = 0,
    seeded_rows: bool = False,
) -> list[int]:
    """One token per row of ``logits``, every row sampled with ``params``."""
    num_rows = logits.shape[0]
    generators: list[torch.Generator | None] = (
        [make_generator(seed * 100_000 + i, CPU) for i in range(num_rows)]
        if seeded_rows
        else [None] * num_rows
    )
    batch = build_batch([params] * num_rows, logits.shape[1], generators=generators)
    return Sampler(make_generator(seed, CPU))(logits, batch).token_ids.tolist()


def total_variation(counts: Counter[int], expected: list[float]) -> float:
    total = sum(counts.values())
    return 0.5 * sum(abs(counts[t] / total - p) for t, p in enumerate(expected))


# --- greedy -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = random_logits(8).to(dtype)
    batch = build_batch([SamplingParams(temperature=0.0)] * 8)
    out = Sampler()(logits, batch)
    assert out.token_ids.dtype == torch.int64
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))


def test_greedy_rows_of_mixed_batch_take_argmax() -> None:
    logits = random_logits(6)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.5) for i in range(6)]
    batch = build_batch(params)
    argmax = logits.argmax(dim=-1)
    for seed in range(20):
        tokens = Sampler(make_generator(seed, CPU))(logits, batch).token_ids
        assert torch.equal(tokens[1::2], argmax[1::2])


def test_build_skips_what_no_row_needs() -> None:
    greedy = build_batch([SamplingParams(temperature=0.0, top_k=5, top_p=0.5)] * 3)
    assert greedy.all_greedy and greedy.is_greedy is None
    assert greedy.top_k is None and greedy.top_p is None and greedy.temperature is None
    assert greedy.penalties is None and greedy.min_tokens_index is None
    assert greedy.max_num_logprobs is None

    plain = build_batch([SamplingParams()] * 3)
    assert not plain.all_greedy and plain.is_greedy is None and plain.needs_default_noise
    assert plain.temperature is None and plain.top_k is None and plain.top_p is None
    assert plain.min_p is None and plain.penalties is None

    freq_only = build_batch([SamplingParams(frequency_penalty=0.5), SamplingParams()])
    assert freq_only.penalties is not None
    assert freq_only.penalties.seen_mask is None and freq_only.penalties.output_counts is not None


def test_build_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="one entry per row"):
        SamplingBatch.build([SamplingParams()] * 2, [[]], [[], []], [None, None], VOCAB, CPU)


def test_rejects_logits_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match="do not match"):
        Sampler()(random_logits(2, VOCAB + 1), build_batch([SamplingParams()] * 2))


def test_leaves_caller_logits_untouched_and_accepts_strided_logits() -> None:
    logits = random_logits(VOCAB, 4).t()  # [4, VOCAB], not contiguous
    before = logits.clone()
    params = SamplingParams(temperature=0.7, top_k=4, repetition_penalty=1.3, logprobs=2)
    batch = build_batch([params] * 4, outputs=[[1, 2]] * 4)
    Sampler(make_generator(0, CPU))(logits, batch)
    assert torch.equal(logits, before)


# --- seeds ------------------------------------------------------------------------


def _seeded_run(
    logits: torch.Tensor, params: SamplingParams, seed: int, steps: int = 10
) -> list[int]:
    generator = make_generator(seed, CPU)
    batch = build_batch([params], generators=[generator])
    sampler = Sampler(make_generator(999, CPU))
    return [sampler(logits, batch).token_ids[0].item() for _ in range(steps)]


def test_seeded_sampling_is_reproducible() -> None:
    logits = random_logits(1) / 3
    params = SamplingParams(temperature=1.2, seed=7)
    first = _seeded_run(logits, params, seed=7, steps=30)
    assert first == _seeded_run(logits, params, seed=7, steps=30)
    assert first != _seeded_run(logits, params, seed=8, steps=30)


def test_seeded_row_does_not_depend_on_batch_composition() -> None:
    row_logits = random_logits(1, seed=3) / 3
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
    alone = _seeded_run(row_logits, params, seed=42)

    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=3, min_p=0.1),
        SamplingParams(temperature=0.5, seed=5, presence_penalty=1.0),
    ]
    logits = torch.cat([random_logits(3, seed=4)[:2], row_logits, random_logits(1, seed=5)])
    generators = [None, None, make_generator(42, CPU), make_generator(5, CPU)]
    batch_outputs = [[1, 2], [3], [], [4]]
    batch = build_batch(
        [*others[:2], params, others[2]], outputs=batch_outputs, generators=generators
    )
    sampler = Sampler(make_generator(123, CPU))
    in_batch = [sampler(logits, batch).token_ids[2].item() for _ in range(10)]
    assert in_batch == alone


def test_a_generator_made_after_draws_elsewhere_continues_where_they_stopped() -> None:
    """A decode rank adopts a seeded request after prefill sampled its first token: its
    generator, made with num_drawn=1, gives the tokens one rank would have sampled."""
    logits = random_logits(1) / 3
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    one_rank = _seeded_run(logits, params, seed=11, steps=12)
    for num_drawn in (1, 5):
        later = make_generator(11, CPU, num_drawn=num_drawn, vocab_size=VOCAB)
        batch = build_batch([params], generators=[later])
        sampler = Sampler(make_generator(999, CPU))
        rest = [sampler(logits, batch).token_ids[0].item() for _ in range(12 - num_drawn)]
        assert rest == one_rank[num_drawn:]


# --- filters and the sampled distribution ------------------------------------------


FILTER_CASES = [
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_k=1), {0}),
    (SamplingParams(top_p=0.6), {0, 1, 2}),  # mass before token 3 is 0.68 >= 0.6
    (SamplingParams(min_p=0.3), {0, 1, 2, 3}),  # keep p >= 0.09
    (SamplingParams(top_k=5, top_p=0.8), {0, 1, 2, 3}),  # nucleus of the renormalized top 5
    (SamplingParams(top_p=0.9, min_p=0.3), {0, 1, 2, 3}),
    (SamplingParams(temperature=0.5, top_k=2), {0, 1}),
    (SamplingParams(temperature=2.0), set(range(8))),
]


@pytest.mark.parametrize("seeded_rows", [False, True])
@pytest.mark.parametrize(("params", "allowed"), FILTER_CASES)
def test_filters_emit_exactly_the_allowed_tokens(
    params: SamplingParams, allowed: set[int], seeded_rows: bool
) -> None:
    num_draws = 4000
    counts = Counter(draw(crafted_logits(num_draws), params, seeded_rows=seeded_rows))
    assert set(counts) == allowed
    # Within the allowed set, tokens follow softmax(logits / T) renormalized.
    tempered = torch.tensor(CRAFTED_PROBS).log().div(params.temperature).softmax(dim=-1)
    kept = torch.zeros_like(tempered)
    kept[list(allowed)] = tempered[list(allowed)]
    assert total_variation(counts, (kept / kept.sum()).tolist()) < 0.04


def test_top_k_one_never_lets_a_near_tie_through() -> None:
    logits = torch.tensor([[0.0, -1e-6, -2e-6, 0.5]]).expand(5000, -1).contiguous()
    assert set(draw(logits, SamplingParams(top_k=1))) == {3}


def test_min_p_keeps_tokens_at_the_threshold() -> None:
    logits = torch.tensor([[1.0, 1.0, 0.0]]).expand(2000, -1).contiguous()
    assert set(draw(logits, SamplingParams(min_p=1.0))) == {0, 1}


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.8])
def test_sampled_distribution_matches_softmax(temperature: float) -> None:
    logits = random_logits(1, 8, seed=11) / 2
    expected = (logits[0] / temperature).softmax(dim=-1).tolist()
    tokens = draw(logits.expand(20_000, -1).contiguous(), SamplingParams(temperature=temperature))
    assert total_variation(Counter(tokens), expected) < 0.02


def test_seeded_rows_follow_softmax() -> None:
    logits = random_logits(1, 8, seed=12) / 2
    expected = logits[0].softmax(dim=-1).tolist()
    tokens = draw(logits.expand(4000, -1).contiguous(), SamplingParams(), seeded_rows=True)
    assert total_variation(Counter(tokens), expected) < 0.04


# --- penalties and min_tokens -------------------------------------------------------


def test_penalties_match_hand_computed_reference() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]] * 2)
    params = [
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),
    ]
    batch = build_batch(params, vocab_size=5, prompts=[[0, 1]] * 2, outputs=[[3, 3, 2]] * 2)
    assert batch.penalties is not None
    # Row 0: repetition on {0, 1, 2, 3}: 2/2, -1*2, 0.5/2, 3/2; then
    # frequency 0.25 * count (token 3: 2, token 2: 1) and presence 0.5 on {2, 3}.
    expected = torch.tensor([[1.0, -2.0, -0.5, 0.5, 0.0], [2.0, -1.0, 0.5, 3.0, 0.0]])
    torch.testing.assert_close(apply_penalties(logits, batch.penalties), expected)
    assert torch.equal(logits[1], expected[1])  # input untouched


def test_greedy_picks_from_penalized_logits() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]])
    repeated = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert Sampler()(logits, build_batch([repeated], 4, prompts=[[0]])).token_ids.tolist() == [1]
    presence = SamplingParams(temperature=0.0, presence_penalty=1.0)
    assert Sampler()(logits, build_batch([presence], 4, outputs=[[0]])).token_ids.tolist() == [1]
    assert Sampler()(logits, build_batch([presence], 4, prompts=[[0]])).token_ids.tolist() == [0]


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.0, 5.0, 0.0, 4.0, 0.0, 0.0]] * 4)
    base = {"temperature": 0.0, "min_tokens": 3, "stop_token_ids": [5, 99], "eos_token_ids": (3,)}
    params = [
        SamplingParams(**base),
        SamplingParams(**base),
        SamplingParams(**base, ignore_eos=True),
        SamplingParams(**{**base, "min_tokens": 0}),
    ]
    outputs = [[1, 1], [1, 1, 1], [1, 1], [1]]
    tokens = Sampler()(logits, build_batch(params, 8, outputs=outputs)).token_ids.tolist()
    assert tokens == [1, 3, 3, 3]


def test_min_tokens_masks_random_rows() -> None:
    params = SamplingParams(min_tokens=1, stop_token_ids=[1], eos_token_ids=(0,))
    assert not {0, 1} & set(draw(crafted_logits(4000), params))


# --- logprobs -------------------------------------------------------------------------


def test_logprobs_come_from_raw_logits() -> None:
    raw = random_logits(4)
    params = [
        SamplingParams(temperature=0.8, repetition_penalty=1.7, logprobs=3),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.3, top_k=4),
        SamplingParams(temperature=0.0, min_tokens=2, eos_token_ids=(0,), logprobs=5),
    ]
    raw[3, 0] = 50.0  # eos is the argmax, so min_tokens forces a token of rank 2
    batch = build_batch(params, prompts=[[1, 2, 3]] * 4, outputs=[[4]] * 4)
    out = Sampler(make_generator(0, CPU))(raw.to(torch.bfloat16), batch)
    reference = raw.to(torch.bfloat16).float().log_softmax(dim=-1)

    assert out.logprobs is not None and out.logprob_token_ids is not None
    assert out.chosen_ranks is not None
    assert out.logprobs.shape == (4, 6) and out.logprobs.dtype == torch.float32
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    chosen = reference.gather(1, out.token_ids.unsqueeze(1))
    torch.testing.assert_close(out.logprobs[:, :1], chosen)
    assert torch.equal(out.chosen_ranks, (reference > chosen).sum(dim=-1) + 1)
    top_values, top_ids = reference.topk(5, dim=-1)
    torch.testing.assert_close(out.logprobs[:, 1:], top_values)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids)
    assert out.chosen_ranks[3].item() == 2 and out.logprob_token_ids[3, 1].item() == 0


def test_no_logprobs_unless_asked() -> None:
    out = Sampler()(random_logits(2), build_batch([SamplingParams()] * 2))
    assert out.logprobs is None and out.logprob_token_ids is None and out.chosen_ranks is None
    assert to_token_logprobs(out, [None, None]) == [None, None]
    with pytest.raises(ValueError, match="no logprobs"):
        to_token_logprobs(out, [None, 1])


def test_to_token_logprobs_per_row() -> None:
    out = SamplerOutput(
        token_ids=torch.tensor([7, 2, 9, 4]),
        logprobs=torch.tensor([[-0.1, -0.1, -2.0, -3.0]] * 2 + [[-5.0, -0.2, -1.5, -4.0]] * 2),
        logprob_token_ids=torch.tensor([[7, 7, 1, 3], [2, 2, 1, 3], [9, 0, 1, 5], [4, 0, 1, 5]]),
        chosen_ranks=torch.tensor([1, 1, 12, 30]),
    )
    rows = to_token_logprobs(out, [None, 0, 2, 3])
    assert rows[0] is None
    assert rows[1] == {2: Logprob(pytest.approx(-0.1), 1)}
    assert rows[2] == {
        9: Logprob(-5.0, 12),
        0: Logprob(pytest.approx(-0.2), 1),
        1: Logprob(-1.5, 2),
    }
    assert list(rows[3] or {}) == [4, 0, 1, 5]  # chosen first, then top-3 by rank
    assert all(lp.decoded_token is None for lp in (rows[3] or {}).values())


def test_to_token_logprobs_keeps_chosen_rank_when_in_top_k() -> None:
    params = [SamplingParams(temperature=0.0, logprobs=4), SamplingParams(logprobs=None)]
    out = Sampler()(random_logits(2), build_batch(params))
    rows = to_token_logprobs(out, [p.logprobs for p in params])
    assert rows[1] is None
    first = rows[0]
    assert first is not None and len(first) == 4
    assert [lp.rank for lp in first.values()] == [1, 2, 3, 4]
    assert next(iter(first)) == out.token_ids[0].item()
    expected = random_logits(2)[0].log_softmax(dim=-1)
    for token, lp in first.items():
        assert math.isclose(lp.logprob, expected[token].item(), rel_tol=1e-5)
