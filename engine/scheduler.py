"""Continuous batching under a token budget.

Each step fills ``max_num_batched_tokens`` with the next tokens of running
sequences first (decode tokens and unfinished prefill chunks, oldest first),
then admits waiting sequences (prefix-cache hits skip their cached blocks).
When blocks run out, the most recently admitted running sequence is
preempted: its blocks are freed and it goes back to the front of the waiting
queue to be recomputed later (its generated tokens are kept, so the output
is the same as without preemption).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk completes the sequence, so a token is sampled."""
        seq = self.seq
        return (
            seq.num_computed_tokens + self.num_new_tokens == seq.num_tokens + seq.num_pending_tokens
        )


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.num_pending_tokens and self._pending_may_finish(seq):
                index += 1  # runs again once the pending token is known
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, num_new, out):
                break  # seq itself was preempted: it was the last one running
            self.block_manager.append(seq, num_new)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            index += 1
        return budget

    def _pending_may_finish(self, seq: Sequence) -> bool:
        """Whether a sequence's pending token may be its last by a rule known now (a
        prefill rank's request stops after one token; max_tokens; max_model_len)."""
        num_tokens = seq.num_tokens + seq.num_pending_tokens
        max_tokens = seq.params.max_tokens
        return (
            seq.prefill_only
            or (max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens)
            or num_tokens >= self.config.max_model_len
        )

    def _make_room(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Preempt from the back of ``running`` until ``seq`` can grow."""
        while not self.block_manager.can_append(seq, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = self._num_new_after_prefix(seq, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_new)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new

    def _num_new_after_prefix(self, seq: Sequence, budget: int) -> int:
        # Peek at the prefix hits to size the chunk that follows them.
        hits = self.block_manager.find_cached_prefix(seq)
        num_cached = len(hits) * self.block_manager.block_size
        return min(seq.num_tokens - num_cached, budget)

    def adopt(self, seq: Sequence) -> None:
        """Run a sequence whose blocks already hold its computed KV (a decode rank
        receiving a prefilled request): it joins ``running`` directly."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def park(self, seq: Sequence) -> None:
        """Stop scheduling a running sequence but keep its blocks (``finish`` frees them)."""
        self.running.remove(seq)
        seq.status = SequenceStatus.PARKED

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.cache_computed_blocks(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Remove ``seq`` wherever it is and release its blocks (keeping them
        in the prefix cache)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.cache_computed_blocks(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def live_sequences(self) -> list[Sequence]:
        return [*self.running, *self.waiting]
