"""The engine's types as the cluster's records (proto/): sampling parameters, per-step
outputs as result entries, and a rank's KV layout and its compatibility fingerprint.
Every conversion here round-trips; tests/pd/test_cluster_wire.py holds them to it."""

from __future__ import annotations

import re

import torch

from engine.kv_cache import KVCacheLayout
from engine.outputs import EngineCoreOutput, Logprob
from engine.sampling_params import SamplingParams
from proto import cluster_pb2 as pb
from proto import pd_comm_pb2 as comm_pb
from scheduler.config import ID_PATTERN

_PLAIN_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
    "include_stop_str_in_output",
)  # fmt: skip
_OPTIONAL_FIELDS = ("seed", "max_tokens", "logprobs")
MAX_LOGPROBS = 20  # the API server's limit (top_logprobs)


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    message = pb.SamplingParams(
        **{name: getattr(params, name) for name in _PLAIN_FIELDS},
        stop=params.stop,
        stop_token_ids=params.stop_token_ids,
        eos_token_ids=params.eos_token_ids,
    )
    for name in _OPTIONAL_FIELDS:
        if getattr(params, name) is not None:
            setattr(message, name, getattr(params, name))
    return message


def params_from_proto(message: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError (from SamplingParams' checks) on values no API server sends."""
    return SamplingParams(
        **{name: getattr(message, name) for name in _PLAIN_FIELDS},
        **{
            name: getattr(message, name) if message.HasField(name) else None
            for name in _OPTIONAL_FIELDS
        },
        stop=list(message.stop),
        stop_token_ids=list(message.stop_token_ids),
        eos_token_ids=tuple(message.eos_token_ids),
    )


def check_dispatched(
    request: pb.DispatchedRequest,
    engine,
    owner_pattern: re.Pattern = ID_PATTERN,  # type: ignore[no-untyped-def]
) -> SamplingParams:
    """A request from another process, checked as the API server checks a client's: the
    owner (an API server id over Redis, a result address when paired by the router),
    the prompt (length, token ids below the vocabulary), its sampling values (ValueError
    naming the field); returns the sampling parameters."""
    if not owner_pattern.fullmatch(request.owner):
        raise ValueError(f"owner {request.owner[:80]!r} is not an API server id or address")
    engine.validate_prompt(list(request.prompt_token_ids))
    params = params_from_proto(request.sampling)
    if params.n != 1:
        raise ValueError(f"sampling.n must be 1 on a rank (one child each), got {params.n}")
    if params.logprobs is not None and params.logprobs > MAX_LOGPROBS:
        raise ValueError(f"sampling.logprobs must be in [0, {MAX_LOGPROBS}]")
    return params


def output_to_entry(output: EngineCoreOutput, index: int, rank_id: str) -> pb.ResultEntry:
    """One step's output of a request; ``index`` is the position of its first new token
    among the request's generated tokens."""
    entry = pb.ResultEntry(
        request_id=output.request_id,
        index=index,
        token_ids=output.new_token_ids,
        finish_reason=output.finish_reason or "",
        rank_id=rank_id,
        num_cached_tokens=output.num_cached_tokens,
    )
    if isinstance(output.stop_reason, int):
        entry.stop_token_id = output.stop_reason
    elif isinstance(output.stop_reason, str):
        entry.stop_string = output.stop_reason
    for logprobs in output.new_logprobs or []:
        # dict order is kept: the sampled token first, then the top alternatives
        entry.logprobs.add(
            token_ids=list(logprobs),
            logprobs=[lp.logprob for lp in logprobs.values()],
            ranks=[lp.rank for lp in logprobs.values()],
        )
    return entry


def entry_to_output(entry: pb.ResultEntry) -> EngineCoreOutput:
    new_logprobs = None
    if entry.logprobs:
        new_logprobs = [
            {
                token_id: Logprob(logprob, rank)
                for token_id, logprob, rank in zip(lp.token_ids, lp.logprobs, lp.ranks, strict=True)
            }
            for lp in entry.logprobs
        ]
    which = entry.WhichOneof("stop_reason")
    return EngineCoreOutput(
        request_id=entry.request_id,
        new_token_ids=list(entry.token_ids),
        new_logprobs=new_logprobs,
        finish_reason=entry.finish_reason or None,
        stop_reason=None if which is None else getattr(entry, which),
        num_cached_tokens=entry.num_cached_tokens,
    )


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layout_to_proto(layout: KVCacheLayout) -> pb.KvLayout:
    return pb.KvLayout(
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_size=layout.block_size,
        num_blocks=layout.num_blocks,
        dtype=dtype_name(layout.dtype),
    )


def layout_from_proto(message: pb.KvLayout) -> KVCacheLayout:
    dtype = getattr(torch, message.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown KV dtype {message.dtype!r}")
    return KVCacheLayout(
        num_layers=message.num_layers,
        num_blocks=message.num_blocks,
        block_size=message.block_size,
        num_kv_heads=message.num_kv_heads,
        head_dim=message.head_dim,
        dtype=dtype,
    )


def kv_fingerprint(
    model: str, layout: KVCacheLayout, tp_size: int, total_kv_heads: int
) -> comm_pb.KvFingerprint:
    """What must match between a prefill rank and a decode rank for KV to move (the
    per-rank fields describe TP rank 0; the TP layouts may differ)."""
    return comm_pb.KvFingerprint(
        model=model,
        dtype=dtype_name(layout.dtype),
        block_size=layout.block_size,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        tp_size=tp_size,
        tp_rank=0,
        total_kv_heads=total_kv_heads,
    )
