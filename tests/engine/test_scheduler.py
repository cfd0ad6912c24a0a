from __future__ import annotations

from engine.block_manager import BlockManager
from engine.config import SchedulerConfig
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence


def make_scheduler(num_blocks=64, block_size=4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size))


def add(scheduler: Scheduler, num_tokens: int, request_id: str) -> Sequence:
    # Distinct tokens per request, so no prefix-cache hits unless a test wants them.
    base = 1000 * (len(scheduler.live_sequences()) + 1)
    tokens = list(range(base, base + num_tokens))
    seq = Sequence(request_id, tokens, SamplingParams(), arrival=0)
    scheduler.add(seq)
    return seq


def complete(scheduler: Scheduler, out, token: int = 7) -> None:
    """What the engine does after a step: advance, publish, append samples."""
    for item in out.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        scheduler.block_manager.cache_computed_blocks(item.seq)
        if samples:
            item.seq.token_ids.append(token)


def test_prefill_chunks_and_decodes_share_the_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=8, max_model_len=64)
    first = add(scheduler, 5, "a")
    complete(scheduler, scheduler.schedule())  # a: 5-token prefill, samples
    second = add(scheduler, 20, "b")
    out = scheduler.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 7)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples
    complete(scheduler, out)
    out = scheduler.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 7)]
    complete(scheduler, out)
    out = scheduler.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 6)]
    assert out.scheduled[1].samples
    assert first.num_tokens == 8 and second.num_tokens == 20


def test_max_num_seqs_limits_running():
    scheduler = make_scheduler(max_num_seqs=2, max_model_len=64)
    for i in range(4):
        add(scheduler, 3, f"r{i}")
    out = scheduler.schedule()
    assert len(out.scheduled) == 2 and len(scheduler.waiting) == 2


def test_preemption_frees_the_newest_and_resumes_it_first():
    scheduler = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    old = add(scheduler, 7, "old")
    new = add(scheduler, 7, "new")
    complete(scheduler, scheduler.schedule())  # both hold 2 blocks; pool is full
    assert scheduler.block_manager.num_free_blocks == 0
    old.num_computed_tokens, new.num_computed_tokens = 8, 8  # next tokens need new blocks
    old.token_ids.append(1)
    new.token_ids.append(1)
    out = scheduler.schedule()
    assert out.preempted == [new] and new.num_computed_tokens == 0
    assert [i.seq for i in out.scheduled] == [old]
    assert scheduler.waiting[0] is new and new.num_preemptions == 1
    scheduler.block_manager.check_invariants(live=scheduler.live_sequences())
    scheduler.finish(old, "length")
    out = scheduler.schedule()
    assert [i.seq for i in out.scheduled] == [new]
    scheduler.finish(new, "length")
    scheduler.block_manager.check_invariants(live=[])
    assert scheduler.block_manager.num_free_blocks == 4


def test_finish_frees_waiting_and_running():
    scheduler = make_scheduler(max_num_seqs=1, max_model_len=64)
    running = add(scheduler, 3, "run")
    waiting = add(scheduler, 3, "wait")
    scheduler.schedule()
    scheduler.finish(waiting, "abort")
    scheduler.finish(running, "abort")
    assert scheduler.num_unfinished == 0
    assert running.finish_reason == waiting.finish_reason == "abort"
    scheduler.block_manager.check_invariants(live=[])


def test_prefix_hit_shortens_the_first_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=64, max_model_len=64)
    first = add(scheduler, 9, "a")
    complete(scheduler, scheduler.schedule())
    twin = Sequence("b", first.prompt_token_ids, SamplingParams(), arrival=1)
    scheduler.add(twin)
    out = scheduler.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 1)]
    assert twin.num_cached_tokens == 8
