"""A worker runs step plans on one device: it owns the model, its KV shard, the
persistent input batch and the sampler, and keeps per-request state across steps.

It applies each ``StepPlan`` as a diff (rows added, blocks and tokens appended, rows
freed), queues the forward (eagerly or as a captured CUDA graph) and the sampler
(``submit``), then waits for the sampled tokens, appends them to its own rows and
returns them (``result``): one read-back per step.

With tensor parallelism every rank of the group runs the same plans. Only the driver
(TP rank 0) samples; it broadcasts the step's token ids, so every rank's rows hold
the same tokens and the next step's inputs agree without another message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import EngineConfig
from engine.distributed import ParallelGroup
from engine.input_batch import InputBatch, StepInputs
from engine.model_runner import KVAllocator, ModelRunner
from engine.read_back import TokenReadBack
from engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    make_generator,
    to_device,
    to_token_logprobs,
)
from engine.sampling_params import SamplingParams
from engine.step_plan import KVSend, NewRequest, StepPlan, StepResult
from engine.token_history import TokenHistory

logger = logging.getLogger(__name__)

# Executes a step's KV sends for one layer, once that layer's K/V are in the cache
# (queued on the current stream). A prefill rank's transfer endpoint provides it.
KVSender = Callable[[int, list[KVSend]], None]


@dataclass
class PendingStep:
    """A submitted step: its sampling rows' states and outputs, still on the device."""

    states: list[RequestState]
    output: SamplerOutput | None  # the driver's; None on other ranks
    read_back: object


@dataclass
class RequestState:
    request_id: str
    row: int
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    num_tokens: int  # prompt + outputs known on the host
    num_pending: int = 0  # sampled by a submitted step, not read back yet
    sampled_index: int = 0  # this request's row among the last step's sampled rows

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens


class Worker:
    def __init__(self, config: EngineConfig, group: ParallelGroup, allocate_kv: KVAllocator):
        self.config = config
        self.group = group
        self.runner = ModelRunner(config, group, allocate_kv)
        self.device = self.runner.device
        sched = config.scheduler
        self.batch = InputBatch(
            sched.max_num_seqs, sched.max_model_len, config.cache.block_size, self.device
        )
        generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.sampler = Sampler(default_generator=generator)
        self.history = TokenHistory(config.model.vocab_size, self.device)
        self.requests: dict[str, RequestState] = {}
        # Preempted requests keep their generator: their draws continue where they were.
        self.suspended_generators: dict[str, torch.Generator | None] = {}
        self.kv_sender: KVSender | None = None
        self._sampling_cache: tuple[tuple[str, ...], SamplingBatch] | None = None
        self._last_sampled: torch.Tensor | None = None  # the last submitted step's tokens
        self._read_back = TokenReadBack(self.device)

    @torch.inference_mode()
    def submit(self, plan: StepPlan) -> PendingStep:
        """Queue the step's work on the device and return without waiting for it. The
        previous step may still be running: its sampled tokens, not known on the host
        yet, feed this step's inputs on the device."""
        self._apply(plan)
        states = [self.requests[r.request_id] for r in plan.running]
        states += [self.requests[r.request_id] for r in plan.new_requests]
        count = len(states)
        num_new = np.fromiter(
            (r.num_new_tokens for r in (*plan.running, *plan.new_requests)), np.int32, count
        )
        rows = np.fromiter((s.row for s in states), dtype=np.int64, count=count)
        totals = np.fromiter((s.num_tokens + s.num_pending for s in states), np.int32, count)
        batch = self.batch
        # A row samples when this step computes its last token.
        sampling_rows = np.flatnonzero(batch.num_computed[rows] + num_new == totals)
        inputs = batch.prepare(rows, num_new, sampling_rows, self._pending_sources(states))
        self._fill_pending_inputs(inputs)
        logits = self.runner.forward(inputs, self._layer_sender(plan.kv_sends))
        batch.num_computed[rows] += num_new
        sampled = [states[i] for i in sampling_rows]
        if not sampled:
            return PendingStep([], None, None)
        out, token_ids = self._sample_or_receive(logits, sampled)
        for index, state in enumerate(sampled):
            state.num_pending += 1
            state.sampled_index = index
        self._last_sampled = token_ids
        return PendingStep(sampled, out, self._read_back.start(token_ids))

    def result(self, step: PendingStep) -> StepResult:
        """Wait for a submitted step; its tokens join the rows of requests still here."""
        if not step.states:
            return StepResult([], [])
        token_ids = self._read_back.wait(step.read_back)  # the step's one read-back
        rows, kept = [], []
        for state, token_id in zip(step.states, token_ids, strict=True):
            if self.requests.get(state.request_id) is not state:
                continue  # left while the step ran (finished, aborted, preempted)
            rows.append(state.row)
            kept.append(token_id)
            state.num_tokens += 1
            state.num_pending -= 1
        if rows:
            self.batch.append_tokens(np.asarray(rows), np.asarray(kept, dtype=np.int32))
        if step.output is None:  # not the driver: nobody reads this rank's logprobs
            return StepResult(token_ids, [None] * len(token_ids))
        logprobs = to_token_logprobs(step.output, [s.params.logprobs for s in step.states])
        return StepResult(token_ids, logprobs)

    def _pending_sources(self, states: list[RequestState]) -> np.ndarray | None:
        """Per row, the index of its last input token among the previous step's sampled
        tokens when that token is still pending (async scheduling), else -1."""
        if not any(s.num_pending for s in states):
            return None
        return np.fromiter(
            (s.sampled_index if s.num_pending else -1 for s in states), np.int64, len(states)
        )

    def _fill_pending_inputs(self, inputs: StepInputs) -> None:
        """Rows whose input token the previous step sampled take it from that step's
        output on the device (no host sync: every row is written, most with itself)."""
        if inputs.pending_src is None or self._last_sampled is None:
            return
        src = inputs.pending_src
        last_token = inputs.query_start_loc[1:].long() - 1  # each row's last flat token
        previous = self._last_sampled.to(inputs.input_ids.dtype)[src.clamp(min=0)]
        current = inputs.input_ids[last_token]
        inputs.input_ids[last_token] = torch.where(src >= 0, previous, current)

    # -- the plan's diff ---------------------------------------------------------------

    def _apply(self, plan: StepPlan) -> None:
        preempted = set(plan.preempted_ids)
        for request_id in plan.removed_ids:
            state = self.requests.pop(request_id, None)
            if state is not None:
                self.batch.remove(state.row)
            if request_id not in preempted:
                self.suspended_generators.pop(request_id, None)  # finished while preempted
            elif state is not None:
                self.suspended_generators[request_id] = state.generator
        for new in plan.new_requests:
            self._add(new)
        for running in plan.running:
            if running.new_block_ids:
                row = self.requests[running.request_id].row
                self.batch.append_blocks(row, running.new_block_ids)

    def _add(self, new: NewRequest) -> None:
        if new.request_id in self.requests:
            raise ValueError(f"request {new.request_id!r} is already on this worker")
        if new.request_id in self.suspended_generators:
            generator = self.suspended_generators.pop(new.request_id)
        elif not self.group.is_driver:  # only the driver samples
            generator = None
        elif new.params.seed is not None:  # outputs so far: sampled on another rank
            num_drawn = len(new.token_ids) - new.num_prompt_tokens
            vocab_size = self.config.model.vocab_size
            generator = make_generator(new.params.seed, self.device, num_drawn, vocab_size)
        else:
            generator = None
        row = self.batch.add(new.token_ids, new.block_ids, new.num_computed_tokens)
        state = RequestState(
            new.request_id, row, new.num_prompt_tokens, new.params, generator, len(new.token_ids)
        )
        self.requests[new.request_id] = state
        if state.params.has_penalties and self.group.is_driver:
            prompt = new.token_ids[: new.num_prompt_tokens]
            self.history.fill(row, prompt, new.token_ids[new.num_prompt_tokens :])

    # -- sampling ------------------------------------------------------------------------

    def _sample_or_receive(
        self, logits: torch.Tensor, states: list[RequestState]
    ) -> tuple[SamplerOutput | None, torch.Tensor]:
        """The step's token ids on every rank: the driver samples them (every rank has
        the whole logits after the LM head's gather) and broadcasts them."""
        if not self.group.is_driver:
            token_ids = torch.empty(len(states), dtype=torch.int64, device=self.device)
            return None, self.group.broadcast(token_ids)
        out = self.sampler(logits, self._sampling_batch(states))
        self._record_history(states, out.token_ids)
        self.group.broadcast(out.token_ids)
        return out, out.token_ids

    def _sampling_batch(self, states: list[RequestState]) -> SamplingBatch:
        """Tensors of the sampling rows; reused while the rows stay the same and no row
        has a rule that reads the tokens so far (penalties, min_tokens)."""
        key = tuple(s.request_id for s in states)
        if self._sampling_cache is not None and self._sampling_cache[0] == key:
            return self._sampling_cache[1]
        params = [s.params for s in states]
        batch = SamplingBatch.build_with(
            params=params,
            output_lens=[s.num_output_tokens for s in states],
            generators=[s.generator for s in states],
            vocab_size=self.config.model.vocab_size,
            device=self.device,
            penalties=self.history.penalties(params, [s.row for s in states]),
        )
        reads_history = any(p.reads_history for p in params)
        self._sampling_cache = None if reads_history else (key, batch)
        return batch

    def _record_history(self, states: list[RequestState], token_ids: torch.Tensor) -> None:
        """Sampled tokens of rows with penalties into the device history (no read-back)."""
        indices = [i for i, s in enumerate(states) if s.params.has_penalties]
        if not indices:
            return
        rows = torch.tensor([states[i].row for i in indices], dtype=torch.int64)
        if len(indices) == len(states):
            tokens = token_ids
        else:
            tokens = token_ids[to_device(torch.tensor(indices), self.device)]
        self.history.record(to_device(rows, self.device), tokens)

    # -- KV sends --------------------------------------------------------------------------

    def _layer_sender(self, sends: list[KVSend]) -> Callable[[int], None] | None:
        if not sends:
            return None
        if self.kv_sender is None:
            raise RuntimeError("the plan has KV sends but this worker has no KV sender")
        sender = self.kv_sender
        return lambda layer: sender(layer, sends)
