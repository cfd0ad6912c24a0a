"""Messages between the API server and an engine-core process, and their one codec.

Frames are msgpack arrays ``[kind, payload]``. A client proves the channel key in its
HELLO (``hello_token``); the engine ignores every other message from an identity that
has not, and drops a frame that is not a message of this codec (``MalformedMessage``).
The API server is a DEALER and the engine a ROUTER bound on
``--engine-worker-queue-port``; the engine replies to the identity a request came from.
Outputs are per-step diffs.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import msgpack

from engine.outputs import EngineCoreOutput, Logprob
from engine.sampling_params import SamplingParams


class Kind(enum.IntEnum):
    HELLO = 0  # api -> engine: channel token (hello_token); READY once the model is loaded
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
    # A prefill or decode rank's serialized pd.cluster.InstanceRecord (what a router
    # needs to pair it); empty for a local rank
    rank_record: bytes = b""


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
    num_requests_taken: int = 0  # since the engine started (EngineCore.num_requests_taken)
    num_dummy_steps: int = 0  # lockstep DP forwards with nothing to run, since start
    expert_tokens: list = field(default_factory=list)  # per expert, since start (MoE only)


KV_EVENT_KINDS = ("transfer", "transfer_failed", "reserve_refused", "redispatched")


@dataclass(frozen=True)
class Pairing:
    """A request paired by pd-router --splitwise: the decode rank to hand its KV to
    (a serialized pd.cluster.InstanceRecord) and the result address its tokens go to."""

    decode_record: bytes
    owner: str


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    pairing: Pairing | None = None


class MalformedMessage(ValueError):
    """A frame that is not a message of this codec (garbage, a wrong shape, bad values)."""


MAX_FRAME_BYTES = 64 << 20  # an ADD of the longest prompt is far below this
MAX_RECORD_BYTES = 8192  # a decode rank's InstanceRecord in a pairing


def hello_token(channel_key: bytes, identity: bytes) -> str:
    """What a client's HELLO carries: proof that it holds the channel key, bound to its
    ZMQ identity (a ROUTER refuses a second connection with a live identity)."""
    return hmac.new(channel_key, identity, hashlib.sha256).hexdigest()


def encode(kind: Kind, payload: Any = None) -> bytes:
    return msgpack.packb([int(kind), _to_wire(kind, payload)], use_bin_type=True)


def decode(frame: bytes) -> tuple[Kind, Any]:
    """The message in ``frame``; MalformedMessage (never another error) when it is not one."""
    if len(frame) > MAX_FRAME_BYTES:
        raise MalformedMessage(f"a frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        if not isinstance(message, list) or len(message) != 2:
            raise MalformedMessage("a frame must be [kind, payload]")
        kind_value, payload = message
        if type(kind_value) is not int or kind_value not in Kind._value2member_map_:
            raise MalformedMessage(f"unknown message kind {kind_value!r:.40}")
        kind = Kind(kind_value)
        return kind, _from_wire(kind, payload)
    except MalformedMessage:
        raise
    except Exception as e:  # msgpack's errors, wrong types, bad sampling values
        raise MalformedMessage(f"{type(e).__name__}: {str(e)[:200]}") from None


def _check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        raise MalformedMessage(f"{what} must be a string of 1-256 characters")
    return value


def _check_token_ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise MalformedMessage("prompt_token_ids must be a list of integers")
    return value


def _pairing(value: Any) -> Pairing | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], bytes)
            and len(value[0]) <= MAX_RECORD_BYTES):  # fmt: skip
        raise MalformedMessage("a pairing is [decode record bytes, owner address]")
    return Pairing(value[0], _check_id(value[1], "owner"))


def _to_wire(kind: Kind, payload: Any) -> Any:
    if kind in (Kind.READY, Kind.STATS):
        return dataclasses.astuple(payload)
    if kind is Kind.ADD:
        pairing = payload.pairing
        return [payload.request_id, payload.prompt_token_ids, payload.params.to_wire(),
                None if pairing is None else [pairing.decode_record, pairing.owner]]  # fmt: skip
    if kind is Kind.OUTPUTS:
        return [_output_to_wire(o) for o in payload]
    return payload


def _from_wire(kind: Kind, payload: Any) -> Any:
    if kind is Kind.READY:
        return EngineInfo(*payload)
    if kind is Kind.STATS:
        return EngineStats(*payload)
    if kind is Kind.ADD:
        request_id, token_ids, params, pairing = payload
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise MalformedMessage("params must be a map of sampling fields")
        return AddRequest(
            _check_id(request_id, "request_id"), _check_token_ids(token_ids),
            SamplingParams.from_wire(params), _pairing(pairing),
        )  # fmt: skip
    if kind is Kind.HELLO:
        if payload is not None and not (isinstance(payload, str) and len(payload) <= 128):
            raise MalformedMessage("a HELLO carries its channel token or nothing")
        return payload
    if kind is Kind.ABORT:
        if not isinstance(payload, list):
            raise MalformedMessage("an ABORT carries a list of request ids")
        return [_check_id(request_id, "request id") for request_id in payload]
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
