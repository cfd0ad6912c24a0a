"""Token sampling for one engine step: penalties, filters, sampling and logprobs.

Per row, in vLLM's order::

    raw logits --log_softmax--> logprobs (reported; nothing below changes them)
        -> repetition / frequency / presence penalties
        -> min_tokens: stop ids masked to -inf
        -> greedy rows: argmax
           random rows: / temperature -> top_k -> top_p -> min_p -> exponential race

``SamplingBatch.build`` does the host-side work (Python lists -> tensors) and leaves
out every tensor that no row needs; ``Sampler.__call__`` never reads a tensor back to
the host, so the caller pays one read-back per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from engine.outputs import Logprob, TokenLogprobs
from engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")
_TINY = torch.finfo(torch.float32).tiny


def make_generator(
    seed: int, device: torch.device, num_drawn: int = 0, vocab_size: int = 0
) -> torch.Generator:
    """A per-request generator; the caller keeps it for the request's whole life.

    ``num_drawn``: tokens this request sampled elsewhere already (a decode rank adopts a
    request after the prefill rank sampled its first token). Each sampled token draws
    one row of ``vocab_size`` exponential noise (``Sampler._exponential_noise``), so
    drawing as many here puts the generator where the other rank's stopped: a seeded
    request then samples the same tokens disaggregated as on one rank."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    if num_drawn > 0:
        discard = torch.empty(vocab_size, dtype=torch.float32, device=device)
        for _ in range(num_drawn):
            discard.exponential_(generator=generator)
    return generator


def to_device(cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)


def _optional_tensor(
    values: Sequence[float] | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    return None if values is None else to_device(torch.tensor(values, dtype=dtype), device)


def _per_row(
    params: Sequence[SamplingParams],
    rows: set[int],
    value: Callable[[SamplingParams], float],
    off: float,
) -> list[float] | None:
    """``value(p)`` for rows in ``rows`` and ``off`` elsewhere; None when every row is off."""
    values = [value(p) if i in rows else off for i, p in enumerate(params)]
    return values if any(v != off for v in values) else None


def _flat_token_index(
    token_ids: Sequence[Sequence[int]], rows: Sequence[int], vocab_size: int
) -> torch.Tensor:
    """Indices ``row * vocab_size + token`` into a flattened [B, V] tensor."""
    parts = [torch.tensor(token_ids[r], dtype=torch.int64) + r * vocab_size for r in rows]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def penalty_values(
    params: Sequence[SamplingParams],
) -> tuple[list[float] | None, list[float] | None, list[float] | None]:
    """Per row (repetition, presence, frequency) penalties; each None when no row uses it."""
    all_rows = set(range(len(params)))
    return (
        _per_row(params, all_rows, lambda p: p.repetition_penalty, 1.0),
        _per_row(params, all_rows, lambda p: p.presence_penalty, 0.0),
        _per_row(params, all_rows, lambda p: p.frequency_penalty, 0.0),
    )


@dataclass
class PenaltyTensors:
    """Penalty inputs of one step; a field is None when no row uses it."""

    seen_mask: torch.Tensor | None  # [B, V] bool: in prompt or output (repetition penalty)
    output_counts: torch.Tensor | None  # [B, V] float32: occurrences in the output
    repetition_penalties: torch.Tensor | None  # [B] float32, 1.0 = off
    presence_penalties: torch.Tensor | None  # [B] float32, 0.0 = off
    frequency_penalties: torch.Tensor | None  # [B] float32, 0.0 = off

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
    ) -> PenaltyTensors | None:
        rep, pres, freq = penalty_values(params)
        if rep is None and pres is None and freq is None:
            return None
        shape = (len(params), vocab_size)
        seen_mask = output_counts = None
        if rep is not None:
            rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
            seen_mask = torch.zeros(shape, dtype=torch.bool, device=device)
            for token_ids in (prompt_token_ids, output_token_ids):
                index = to_device(_flat_token_index(token_ids, rows, vocab_size), device)
                seen_mask.view(-1).index_fill_(0, index, True)
        if pres is not None or freq is not None:
            rows = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
            index = to_device(_flat_token_index(output_token_ids, rows, vocab_size), device)
            output_counts = torch.zeros(shape, dtype=torch.float32, device=device)
            output_counts.view(-1).index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
        return cls(
            seen_mask=seen_mask,
            output_counts=output_counts,
            repetition_penalties=_optional_tensor(rep, torch.float32, device),
            presence_penalties=_optional_tensor(pres, torch.float32, device),
            frequency_penalties=_optional_tensor(freq, torch.float32, device),
        )


def apply_penalties(logits: torch.Tensor, penalties: PenaltyTensors) -> torch.Tensor:
    """Penalized float32 logits (HF/vLLM rules); ``logits`` itself is left unchanged."""
    if penalties.repetition_penalties is not None:
        assert penalties.seen_mask is not None
        rep = penalties.repetition_penalties.unsqueeze(1)
        scaled = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(penalties.seen_mask, scaled, logits)
    counts = penalties.output_counts
    if penalties.frequency_penalties is not None:
        assert counts is not None
        logits = logits - penalties.frequency_penalties.unsqueeze(1) * counts
    if penalties.presence_penalties is not None:
        assert counts is not None
        logits = logits - penalties.presence_penalties.unsqueeze(1) * (counts > 0)
    return logits


def _min_tokens_index(
    params: Sequence[SamplingParams],
    output_lens: Sequence[int],
    vocab_size: int,
    device: torch.device,
) -> torch.Tensor | None:
    # Stop ids outside the vocabulary can never be sampled, so they need no mask.
    flat = [
        row * vocab_size + token
        for row, p in enumerate(params)
        if output_lens[row] < p.min_tokens
        for token in sorted(p.all_stop_token_ids)
        if token < vocab_size
    ]
    return to_device(torch.tensor(flat, dtype=torch.int64), device) if flat else None


@dataclass
class SamplingBatch:
    """Per-step tensors for the B rows that sample this step; None = no row needs it.

    Filter tensors hold a no-op value on greedy rows and rows without the filter
    (top_k = V, top_p = +inf, min_p = 0, temperature = 1).
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    is_greedy: torch.Tensor | None  # [B] bool; None unless the batch mixes greedy and random
    temperature: torch.Tensor | None  # [B] float32
    top_k: torch.Tensor | None  # [B] int64
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    penalties: PenaltyTensors | None
    min_tokens_index: torch.Tensor | None  # [N] int64 flat indices row * V + stop id
    seeded_rows: list[tuple[int, torch.Generator]] = field(default_factory=list)
    needs_default_noise: bool = False  # some random row has no generator of its own
    max_num_logprobs: int | None = None

    @property
    def is_plain_greedy(self) -> bool:
        """Argmax of the raw logits is the whole answer (no penalty, mask or logprobs)."""
        return (
            self.all_greedy
            and self.penalties is None
            and self.min_tokens_index is None
            and self.max_num_logprobs is None
        )

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
    ) -> SamplingBatch:
        """From each row's tokens as lists (the penalties' inputs are built here)."""
        num_rows = len(params)
        if not len(prompt_token_ids) == len(output_token_ids) == len(generators) == num_rows:
            raise ValueError(
                f"need one entry per row: {num_rows} params, {len(prompt_token_ids)} prompts, "
                f"{len(output_token_ids)} outputs, {len(generators)} generators"
            )
        penalties = PenaltyTensors.build(
            params, prompt_token_ids, output_token_ids, vocab_size, device
        )
        output_lens = [len(ids) for ids in output_token_ids]
        return cls.build_with(params, output_lens, generators, vocab_size, device, penalties)

    @classmethod
    def build_with(
        cls,
        params: list[SamplingParams],
        output_lens: list[int],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
        penalties: PenaltyTensors | None,
    ) -> SamplingBatch:
        """From penalty inputs built elsewhere (a worker's TokenHistory)."""
        num_rows = len(params)
        random_rows = {i for i, p in enumerate(params) if not p.is_greedy}
        seeded_rows = [(i, g) for i in sorted(random_rows) if (g := generators[i]) is not None]
        is_mixed = 0 < len(random_rows) < num_rows
        asked = [p.logprobs for p in params if p.logprobs is not None]

        def per_random_row(
            value: Callable[[SamplingParams], float], off: float
        ) -> list[float] | None:
            return _per_row(params, random_rows, value, off)

        temperature = per_random_row(lambda p: p.temperature, 1.0)
        top_k = per_random_row(
            lambda p: p.top_k if 0 < p.top_k < vocab_size else vocab_size, vocab_size
        )
        top_p = per_random_row(lambda p: p.top_p if p.top_p < 1.0 else math.inf, math.inf)
        min_p = per_random_row(lambda p: p.min_p, 0.0)
        f32 = torch.float32
        return cls(
            num_rows=num_rows,
            vocab_size=vocab_size,
            all_greedy=not random_rows,
            is_greedy=_optional_tensor(
                [p.is_greedy for p in params] if is_mixed else None, torch.bool, device
            ),
            temperature=_optional_tensor(temperature, f32, device),
            top_k=_optional_tensor(top_k, torch.int64, device),
            top_p=_optional_tensor(top_p, f32, device),
            min_p=_optional_tensor(min_p, f32, device),
            penalties=penalties,
            min_tokens_index=_min_tokens_index(params, output_lens, vocab_size, device),
            seeded_rows=seeded_rows,
            needs_default_noise=len(seeded_rows) < len(random_rows),
            max_num_logprobs=max(asked, default=None),
        )


@dataclass
class SamplerOutput:
    """One step's result, still on the device; read it back once per step."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B, 1 + K] float32: chosen token, then top-K
    logprob_token_ids: torch.Tensor | None = None  # [B, 1 + K] int64
    chosen_ranks: torch.Tensor | None = None  # [B] int64, 1 = most likely


class Sampler:
    """Picks one token per row of [B, V] logits; the module docstring gives the order.

    Rows with a generator of their own draw their noise from it alone, so a seeded
    row's tokens do not depend on the other rows of the batch. Other rows share
    ``default_generator`` (torch's global generator when None).
    """

    def __init__(self, default_generator: torch.Generator | None = None) -> None:
        self.default_generator = default_generator

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if tuple(logits.shape) != (batch.num_rows, batch.vocab_size):
            raise ValueError(
                f"logits of shape {tuple(logits.shape)} do not match the batch "
                f"({batch.num_rows} rows, vocab size {batch.vocab_size})"
            )
        if batch.is_plain_greedy:
            # The float32 copy below changes no argmax: every bf16/fp16 value is exact in it.
            return SamplerOutput(token_ids=logits.argmax(dim=-1))
        # NOTE: a contiguous float32 copy, edited in place below; the caller's logits stay intact.
        logits = logits.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        raw_logprobs = None if batch.max_num_logprobs is None else logits.log_softmax(dim=-1)
        if batch.penalties is not None:
            logits = apply_penalties(logits, batch.penalties)
        if batch.min_tokens_index is not None:
            logits.view(-1).index_fill_(0, batch.min_tokens_index, _NEG_INF)
        token_ids = self._sample(logits, batch)
        if raw_logprobs is None or batch.max_num_logprobs is None:
            return SamplerOutput(token_ids=token_ids)
        return _gather_logprobs(raw_logprobs, token_ids, batch.max_num_logprobs)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        greedy_ids = None if batch.is_greedy is None else logits.argmax(dim=-1)
        if batch.temperature is not None:
            logits.div_(batch.temperature.unsqueeze(1))
        probs = _filtered_probs(logits, batch)
        # Exponential race: argmax(p / q), q ~ Exp(1), draws token i with probability p_i.
        sampled = probs.div_(self._exponential_noise(probs, batch)).argmax(dim=-1)
        if greedy_ids is None or batch.is_greedy is None:
            return sampled
        return torch.where(batch.is_greedy, greedy_ids, sampled)

    def _exponential_noise(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        noise = torch.empty_like(probs)
        if batch.needs_default_noise:
            noise.exponential_(generator=self.default_generator)
        else:
            noise.fill_(1.0)  # only greedy rows are left, and their draws are discarded
        for row, generator in batch.seeded_rows:
            noise[row].exponential_(generator=generator)
        # NOTE: exponential_ can return exactly 0, and 0 / 0 = NaN wins argmax, which
        # would let a token of zero probability through; tiny > 0 keeps p = 0 at 0.
        return noise.clamp_min_(_TINY)


def _filtered_probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Probabilities after top_k, top_p and min_p; excluded tokens are exactly 0."""
    if batch.top_k is not None or batch.top_p is not None:
        logits = _apply_top_k_top_p(logits, batch.top_k, batch.top_p)
    probs = logits.softmax(dim=-1)
    if batch.min_p is not None:
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p.unsqueeze(1)
        probs.masked_fill_(probs < threshold, 0.0)
    return probs


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Logits with tokens outside top_k, then outside the top_p nucleus, set to -inf."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        positions = torch.arange(logits.shape[-1], device=logits.device)
        sorted_logits.masked_fill_(positions >= top_k.unsqueeze(1), _NEG_INF)
    if top_p is not None:
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token: 0 for the top token, so it is always kept.
        mass_before = sorted_probs.cumsum(dim=-1).sub_(sorted_probs)
        sorted_logits.masked_fill_(mass_before >= top_p.unsqueeze(1), _NEG_INF)
    return torch.full_like(logits, _NEG_INF).scatter_(-1, sorted_ids, sorted_logits)


def _gather_logprobs(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int
) -> SamplerOutput:
    chosen_ids = token_ids.unsqueeze(1)
    chosen = raw_logprobs.gather(1, chosen_ids)
    ranks = (raw_logprobs > chosen).sum(dim=-1).add_(1)
    logprobs, logprob_ids = chosen, chosen_ids
    num_top = min(num_logprobs, raw_logprobs.shape[-1])
    if num_top > 0:
        top_logprobs, top_ids = raw_logprobs.topk(num_top, dim=-1)
        logprobs = torch.cat([chosen, top_logprobs], dim=1)
        logprob_ids = torch.cat([chosen_ids, top_ids], dim=1)
    return SamplerOutput(token_ids, logprobs, logprob_ids, ranks)


def to_token_logprobs(
    output: SamplerOutput, num_logprobs: Sequence[int | None]
) -> list[TokenLogprobs | None]:
    """Per row None, or the chosen token plus the row's top-k (k = ``num_logprobs[row]``).

    The chosen token comes first and keeps its own rank when it is also in the top-k.
    """
    if all(k is None for k in num_logprobs):
        return [None] * len(num_logprobs)
    if output.logprobs is None or output.logprob_token_ids is None or output.chosen_ranks is None:
        raise ValueError("the sampler computed no logprobs for this batch")
    if len(num_logprobs) != output.logprobs.shape[0]:
        raise ValueError(f"{len(num_logprobs)} entries for {output.logprobs.shape[0]} rows")
    width = output.logprobs.shape[1]
    # One read-back: float64 holds the float32 logprobs and every vocabulary id exactly.
    packed = torch.cat(
        [output.logprobs, output.logprob_token_ids, output.chosen_ranks.unsqueeze(1)], dim=1
    )
    rows = packed.to(torch.float64).tolist()
    return [
        None if k is None else _row_logprobs(row[:width], row[width:-1], row[-1], k)
        for row, k in zip(rows, num_logprobs, strict=True)
    ]


def _row_logprobs(
    values: list[float], token_ids: list[float], chosen_rank: float, k: int
) -> TokenLogprobs:
    entries = {int(token_ids[0]): Logprob(values[0], int(chosen_rank))}
    for position in range(1, min(k + 1, len(values))):
        entries.setdefault(int(token_ids[position]), Logprob(values[position], position))
    return entries
