"""One engine step as plain data: what the scheduler decided, for the workers to run.

The engine core (scheduler + block manager) sends a ``StepPlan`` each step; a
worker keeps its own state per request and applies the plan as a diff:

    new_requests   first time on the worker (or back after preemption): all of the
                   request's tokens, its blocks and how many tokens its KV holds
    running        already on the worker: only the blocks added and the number of
                   tokens to compute this step (the worker appended what it sampled)
    removed_ids    gone from the batch since the last plan (finished, aborted, parked
                   on a prefill rank, preempted); a preempted one comes back later as
                   a new request and keeps its seeded generator
    kv_sends       a prefill rank's writes of this step: which blocks go to which
                   peer blocks, sent layer by layer by the worker that owns the KV

Rows run in plan order: ``running`` first, then ``new_requests``. Nothing here is a
live object (no tensors, no sequences, no callbacks), so a plan can cross to worker
processes with one codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass
class NewRequest:
    request_id: str
    token_ids: list[int]  # prompt + outputs so far
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens whose KV is in the blocks already (prefix hits, adopted)
    num_new_tokens: int  # tokens to compute this step


@dataclass
class RunningRequest:
    request_id: str
    new_block_ids: list[int]  # appended to the request's block table
    num_new_tokens: int


@dataclass
class KVTarget:
    """Where a request's KV goes: a peer's blocks, opened for one transfer. Every TP rank
    writes its own heads to the peer TP ranks that hold them (``endpoints[j]`` is the
    peer's TP rank j; with equal TP sizes rank i writes rank i)."""

    protocol: str
    peer_key: str  # the peer's pool, as the transfer engines name it
    transfer_id: bytes
    peer_num_blocks: int  # the peer pool's size (its heads per rank follow its TP size)
    endpoints: list[dict]  # one per peer TP rank (msgpack-able descriptors)


@dataclass
class KVSend:
    """Write blocks of one request into a peer's blocks after each layer's K/V land."""

    request_id: str
    src_block_ids: list[int]
    dst_block_ids: list[int]
    target: KVTarget


@dataclass
class StepPlan:
    running: list[RunningRequest] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    removed_ids: list[str] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)  # subset of removed_ids
    kv_sends: list[KVSend] = field(default_factory=list)


@dataclass
class StepResult:
    """Per sampling row, in plan order: the sampled token (and logprobs when asked)."""

    token_ids: list[int]
    logprobs: list  # list[TokenLogprobs | None], one per sampled token
