"""Messages between the API server and an engine-core process, and their one codec.

Frames are msgpack arrays ``[kind, payload]``. The API server is a DEALER and
the engine a ROUTER bound on ``--engine-worker-queue-port``; the engine replies
to the identity a request came from. Outputs are per-step diffs.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from engine.outputs import EngineCoreOutput, Logprob
from engine.sampling_params import SamplingParams


class Kind(enum.IntEnum):
    HELLO = 0  # api -> engine: who I am; answered with READY once the model is loaded
    READY = 1  # engine -> api: EngineInfo
    ADD = 2  # api -> engine: AddRequest
    ABORT = 3  # api -> engine: list of request ids
    OUTPUTS = 4  # engine -> api: list of EngineCoreOutput, one engine step
    STATS = 5  # engine -> api: EngineStats
    REJECTED = 6  # engine -> api: [request id, message] for a request it refused
    SHUTDOWN = 7  # api -> engine: stop after this message


@dataclass
class EngineInfo:
    max_model_len: int
    num_blocks: int
    block_size: int
    vocab_size: int


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    # KV hand-off events since the last stats: [kind, protocol, bytes, seconds], kind one
    # of KV_EVENT_KINDS (a prefill rank's view; empty elsewhere)
    kv_events: list = field(default_factory=list)
    # Per TP rank (rank 0 first): whether its worker is alive. Every rank holds the
    # same blocks (one block manager per DP rank), so KV use is the same on each.
    tp_workers_alive: list = field(default_factory=lambda: [True])


KV_EVENT_KINDS = ("transfer", "transfer_failed", "reserve_refused", "redispatched")


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


def encode(kind: Kind, payload: Any = None) -> bytes:
    return msgpack.packb([int(kind), _to_wire(kind, payload)], use_bin_type=True)


def decode(frame: bytes) -> tuple[Kind, Any]:
    kind_value, payload = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    kind = Kind(kind_value)
    return kind, _from_wire(kind, payload)


def _to_wire(kind: Kind, payload: Any) -> Any:
    if kind in (Kind.READY, Kind.STATS):
        return dataclasses.astuple(payload)
    if kind is Kind.ADD:
        params = dataclasses.asdict(payload.params)
        return [payload.request_id, payload.prompt_token_ids, params]
    if kind is Kind.OUTPUTS:
        return [_output_to_wire(o) for o in payload]
    return payload


def _from_wire(kind: Kind, payload: Any) -> Any:
    if kind is Kind.READY:
        return EngineInfo(*payload)
    if kind is Kind.STATS:
        return EngineStats(*payload)
    if kind is Kind.ADD:
        request_id, token_ids, params = payload
        params["eos_token_ids"] = tuple(params["eos_token_ids"])
        return AddRequest(request_id, token_ids, SamplingParams(**params))
    if kind is Kind.OUTPUTS:
        return [_output_from_wire(o) for o in payload]
    return payload


def _output_to_wire(out: EngineCoreOutput) -> list:
    logprobs = None
    if out.new_logprobs is not None:
        # per token: [[token id, logprob, rank], ...]; decoded text is the API side's job
        logprobs = [
            [[tid, lp.logprob, lp.rank] for tid, lp in entry.items()] for entry in out.new_logprobs
        ]
    return [
        out.request_id,
        out.new_token_ids,
        logprobs,
        out.finish_reason,
        out.stop_reason,
        out.num_cached_tokens,
    ]


def _output_from_wire(wire: list) -> EngineCoreOutput:
    request_id, token_ids, logprobs, finish_reason, stop_reason, num_cached = wire
    new_logprobs = None
    if logprobs is not None:
        new_logprobs = [{tid: Logprob(lp, rank) for tid, lp, rank in entry} for entry in logprobs]
    return EngineCoreOutput(
        request_id, token_ids, new_logprobs, finish_reason, stop_reason, num_cached
    )
