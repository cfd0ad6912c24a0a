"""One DP rank's engine: requests in, per-step token diffs out.

``EngineCore.step`` schedules a batch, runs the model, appends the sampled
tokens and applies token-level stops (eos, stop token ids, max_tokens,
max_model_len). Text-level stops (stop strings) are the output processor's:
it aborts a request here when one matches.

The step itself runs elsewhere: the core turns each schedule into a ``StepPlan``
(plain data; only what changed for requests the workers already hold) and the
executor runs it on the rank's workers, which sample and return the new tokens.

Disaggregation adds two doors: a prefill rank adds requests ``prefill_only`` (they
are parked with their blocks once the first token is sampled, until
``release_parked``), and a decode rank ``adopt_request``s a request whose prompt KV
another rank wrote into blocks it reserved.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.data_parallel import join_data_parallel_group, spans_data_parallel
from engine.executor import make_executor
from engine.kv_cache import allocate_kv_cache
from engine.model_runner import KVAllocator
from engine.outputs import EngineCoreOutput, TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.step_plan import KVSend, NewRequest, RunningRequest, StepPlan
from engine.worker import PendingStep

# Given a step's schedule (before its forward), the KV writes the step makes.
KVSendPlanner = Callable[[list[ScheduledSequence]], list[KVSend]]
# A submitted step and its rows in plan order, each with whether it samples.
InFlight = tuple[PendingStep, list[tuple[ScheduledSequence, bool]]]


def check_prompt(prompt_token_ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """Raise ValueError if an engine with these limits cannot serve the prompt (the one
    rule, also applied where the engine runs in another process: the offline LLM's DP
    ranks)."""
    num_tokens = len(prompt_token_ids)
    if num_tokens == 0:
        raise ValueError("prompt is empty: it must contain at least one token")
    if num_tokens >= max_model_len:
        raise ValueError(
            f"prompt has {num_tokens} tokens but max_model_len is {max_model_len}: "
            f"at most {max_model_len - 1} prompt tokens leave room for one new token"
        )
    bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}); got {bad[:5]}")


class EngineCore:
    def __init__(self, config: EngineConfig, allocate_kv: KVAllocator | None = None):
        self.config = config
        # First, before any weight loads: a rank that serves another model fails fast.
        self.dp_group = join_data_parallel_group(config)
        # MoE layers over all DP ranks meet in collectives at every forward, so then the
        # ranks step in lockstep: whenever any has work, each runs one forward per step,
        # a dummy one (no rows) when it has nothing to run (see should_step).
        self.lockstep = spans_data_parallel(config)
        self.executor = make_executor(config, allocate_kv or allocate_kv_cache)
        self.block_manager = BlockManager(
            self.executor.kv_layout.num_blocks,
            config.cache.block_size,
            config.cache.enable_prefix_caching,
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.sequences: dict[str, Sequence] = {}  # every request holding state, parked too
        self.num_requests_taken = 0  # added or adopted since start (per-rank load metric)
        self.num_dummy_steps = 0  # lockstep forwards with nothing of this rank's to run
        self.num_parked = 0
        self.stalled = False  # the last step found nothing it could schedule
        self._arrivals = itertools.count()
        # What the workers hold: request id -> number of its block ids they know.
        self._on_workers: dict[str, int] = {}
        self._preempted: set[str] = set()  # off the workers, coming back
        self._removed: list[str] = []  # left the workers since the last plan
        # Async scheduling: the step submitted last, still running on the device.
        self._in_flight: InFlight | None = None

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError if the prompt cannot be served; nothing is allocated."""
        check_prompt(prompt_token_ids, self.max_model_len, self.config.model.vocab_size)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> None:
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        seq.prefill_only = prefill_only
        self.sequences[request_id] = seq
        self.num_requests_taken += 1
        self.scheduler.add(seq)

    def adopt_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        params: SamplingParams,
        block_ids: list[int],
    ) -> None:
        """Continue a request prefilled elsewhere: ``block_ids`` (from
        ``block_manager.allocate_blocks``) hold the prompt's KV; the outputs so far
        (the first token) are computed next."""
        seq = self._new_sequence(request_id, prompt_token_ids, params)
        if len(block_ids) != self.block_manager.num_blocks_for(len(prompt_token_ids)):
            raise ValueError(
                f"{request_id}: {len(block_ids)} blocks do not hold a prompt of "
                f"{len(prompt_token_ids)} tokens"
            )
        seq.token_ids += output_token_ids
        seq.block_ids = list(block_ids)
        seq.num_computed_tokens = len(prompt_token_ids)
        self.sequences[request_id] = seq
        self.num_requests_taken += 1
        self.scheduler.adopt(seq)

    def _new_sequence(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Sequence:
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_token_ids)
        if not params.eos_token_ids and self.config.model.eos_token_ids:
            params = dataclasses.replace(params, eos_token_ids=self.config.model.eos_token_ids)
        return Sequence(request_id, prompt_token_ids, params, next(self._arrivals))

    def release_parked(self, request_id: str) -> None:
        """Free a parked request's blocks (its KV hand-off is over)."""
        seq = self.sequences.pop(request_id)
        if seq.status is not SequenceStatus.PARKED:
            raise RuntimeError(f"{request_id} is not parked ({seq.status.value})")
        self.num_parked -= 1
        self._finish(seq, "transferred")

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        outputs = []
        for request_id in request_ids:
            seq = self.sequences.pop(request_id, None)
            if seq is None:
                continue
            if seq.status is SequenceStatus.PARKED:
                self.num_parked -= 1
            self._finish(seq, "abort")
            outputs.append(EngineCoreOutput(request_id, [], finish_reason="abort"))
        return outputs

    def has_unfinished(self) -> bool:
        """Whether a step has requests to run or results to bring back (parked ones do
        not count)."""
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None

    def should_step(self) -> bool:
        """Whether the caller's loop should step now: when this rank has work or, in
        lockstep, when any DP rank has. NOTE: in lockstep this is a collective: every
        rank's loop calls it once per iteration and steps exactly when it says so."""
        busy = self.has_unfinished()
        return self.dp_group.any_busy(busy) if self.lockstep else busy

    def step(self, plan_kv_sends: KVSendPlanner | None = None) -> list[EngineCoreOutput]:
        if self.config.async_scheduling:
            if plan_kv_sends is not None:
                raise RuntimeError("async scheduling runs no KV sends (mixed instances only)")
            return self._step_ahead()
        submitted = self._submit(plan_kv_sends)
        self.stalled = submitted is None
        if submitted is None:
            self._check_progress()
            return []
        return self._bring_back(*submitted)

    def _step_ahead(self) -> list[EngineCoreOutput]:
        """Async scheduling: submit the next step, then bring back the one before it, so
        the device runs one step while the host finishes the previous one and schedules.

        The next step is scheduled before the previous step's tokens are known: each
        sequence that sampled counts one pending token (its position is computed next,
        its value comes from the device). A pending token that ends its sequence (eos,
        a stop id) costs that sequence one wasted row in the next step. Only a mixed
        instance does this: the blocks of a sequence that ends while a step still writes
        them are reused only by later steps, in stream order (no peer writes them).
        """
        submitted = self._submit(None)
        previous, self._in_flight = self._in_flight, submitted
        self.stalled = previous is None and submitted is None
        if previous is None:
            if self.stalled:
                self._check_progress()
            return []
        return self._bring_back(*previous)

    def _submit(self, plan_kv_sends: KVSendPlanner | None) -> InFlight | None:
        """Schedule a step and queue it on the workers; None when nothing can run.
        Its sequences count what it computes now, and what it samples as pending."""
        schedule = self.scheduler.schedule()
        for seq in schedule.preempted:
            self._leave_workers(seq.request_id, preempted=True)
        if schedule.is_empty:
            if self.lockstep:  # a dummy batch: no rows, no KV writes, no outputs
                self.executor.submit(StepPlan())
                self.num_dummy_steps += 1
            return None
        plan, rows = self._plan(schedule)
        if plan_kv_sends is not None:
            plan.kv_sends = plan_kv_sends(schedule.scheduled)
        samples = [item.samples for item in rows]
        pending = self.executor.submit(plan)
        for item, sample in zip(rows, samples, strict=True):
            item.seq.num_computed_tokens += item.num_new_tokens
            item.seq.num_pending_tokens += sample
        return pending, list(zip(rows, samples, strict=True))

    def _check_progress(self) -> None:
        """Called when a step found nothing to run and nothing is on the device."""
        if self.scheduler.num_unfinished and not self.num_parked:
            # Cannot happen while the pool holds one max_model_len sequence
            # (checked at start-up); failing beats a caller spinning forever.
            # (Parked requests free their blocks soon: then waiting is right.)
            raise RuntimeError(
                f"scheduler made no progress with {self.scheduler.num_unfinished} "
                f"unfinished requests and {self.block_manager.num_free_blocks} free blocks"
            )

    def expert_token_counts(self) -> list[int]:
        """Tokens this DP rank routed to each expert since start (MoE models; else [])."""
        return self.executor.worker.runner.expert_token_counts()

    def close(self) -> None:
        """Stop the workers this engine started (TP worker processes)."""
        self.executor.close()

    def wait_in_flight(self) -> list[EngineCoreOutput]:
        """Bring back the step still running on the device (async scheduling), if any."""
        previous, self._in_flight = self._in_flight, None
        return [] if previous is None else self._bring_back(*previous)

    def _bring_back(
        self, pending: PendingStep, rows: list[tuple[ScheduledSequence, bool]]
    ) -> list[EngineCoreOutput]:
        result = self.executor.result(pending)
        sampled = iter(zip(result.token_ids, result.logprobs, strict=True))
        outputs = []
        for item, samples in rows:
            seq = item.seq
            if not samples:
                self.block_manager.cache_computed_blocks(seq)
                continue
            token_id, logprobs = next(sampled)
            seq.num_pending_tokens -= 1
            if seq.status is SequenceStatus.FINISHED or seq.request_id not in self.sequences:
                continue  # ended while this step ran: a wasted row
            outputs.append(self._append_token(seq, token_id, logprobs))
            if seq.status is not SequenceStatus.FINISHED:
                self.block_manager.cache_computed_blocks(seq)
        return outputs

    def _plan(self, schedule: SchedulerOutput) -> tuple[StepPlan, list[ScheduledSequence]]:
        """The schedule as a diff against what the workers hold, and the scheduled
        sequences in the plan's row order (running ones first, then new ones)."""
        removed, self._removed = self._removed, []
        preempted = [r for r in removed if r in self._preempted]
        plan = StepPlan(removed_ids=removed, preempted_ids=preempted)
        running_rows, new_rows = [], []
        for item in schedule.scheduled:
            seq = item.seq
            request_id = seq.request_id
            num_known = self._on_workers.get(request_id)
            if num_known is None:
                plan.new_requests.append(
                    NewRequest(
                        request_id,
                        list(seq.token_ids),
                        seq.num_prompt_tokens,
                        seq.params,
                        list(seq.block_ids),
                        seq.num_computed_tokens,
                        item.num_new_tokens,
                    )
                )
                self._preempted.discard(request_id)
                new_rows.append(item)
            else:
                new_blocks = seq.block_ids[num_known:]
                plan.running.append(RunningRequest(request_id, new_blocks, item.num_new_tokens))
                running_rows.append(item)
            self._on_workers[request_id] = len(seq.block_ids)
        return plan, running_rows + new_rows

    def _leave_workers(self, request_id: str, preempted: bool = False) -> None:
        """Tell the workers with the next plan; a preempted request's state (its seeded
        generator) stays there until it comes back or finishes."""
        if self._on_workers.pop(request_id, None) is not None or request_id in self._preempted:
            self._removed.append(request_id)
        if preempted:
            self._preempted.add(request_id)
        else:
            self._preempted.discard(request_id)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        self.scheduler.finish(seq, reason, stop_reason)
        self._leave_workers(seq.request_id)

    def _append_token(
        self, seq: Sequence, token_id: int, logprobs: TokenLogprobs | None
    ) -> EngineCoreOutput:
        seq.token_ids.append(token_id)
        out = EngineCoreOutput(
            seq.request_id,
            [token_id],
            new_logprobs=None if logprobs is None else [logprobs],
            num_cached_tokens=seq.num_cached_tokens,
        )
        finish = self._check_stop(seq, token_id)
        if finish is not None:
            out.finish_reason, out.stop_reason = finish
        if seq.prefill_only:
            # Finished or not, its blocks may still be read by a transfer.
            self.scheduler.park(seq)
            self._leave_workers(seq.request_id)
            self.num_parked += 1
        elif finish is not None:
            self._finish(seq, *finish)
            del self.sequences[seq.request_id]
        return out

    def _check_stop(self, seq: Sequence, token_id: int) -> tuple[str, int | None] | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                return "stop", token_id
            if not params.ignore_eos and token_id in params.eos_token_ids:
                return "stop", None
        if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None
