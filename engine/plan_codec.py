"""StepPlan <-> bytes: the one codec a plan crosses to TP worker processes with.

msgpack of nested arrays in the dataclasses' field order (never pickle: a worker
decodes numbers, strings and lists, nothing that runs code). Both ends run the
same code, so positions are the schema; sampling parameters travel in their one
wire form (``SamplingParams.to_wire``) and are validated again on arrival.
"""

from __future__ import annotations

import msgpack

from engine.sampling_params import SamplingParams
from engine.step_plan import KVSend, KVTarget, NewRequest, RunningRequest, StepPlan


def encode_plan(plan: StepPlan) -> bytes:
    return msgpack.packb(
        [
            [[r.request_id, r.new_block_ids, r.num_new_tokens] for r in plan.running],
            [_new_request_to_wire(r) for r in plan.new_requests],
            plan.removed_ids,
            plan.preempted_ids,
            [send_to_wire(s) for s in plan.kv_sends],
        ],
        use_bin_type=True,
    )


def decode_plan(data: bytes) -> StepPlan:
    running, new_requests, removed_ids, preempted_ids, kv_sends = msgpack.unpackb(
        data, raw=False, use_list=True
    )
    return StepPlan(
        running=[RunningRequest(*r) for r in running],
        new_requests=[_new_request_from_wire(r) for r in new_requests],
        removed_ids=removed_ids,
        preempted_ids=preempted_ids,
        kv_sends=[send_from_wire(s) for s in kv_sends],
    )


def _new_request_to_wire(r: NewRequest) -> list:
    return [
        r.request_id, r.token_ids, r.num_prompt_tokens, r.params.to_wire(), r.block_ids,
        r.num_computed_tokens, r.num_new_tokens,
    ]  # fmt: skip


def _new_request_from_wire(wire: list) -> NewRequest:
    request_id, token_ids, num_prompt, params, block_ids, num_computed, num_new = wire
    params = SamplingParams.from_wire(params)
    return NewRequest(request_id, token_ids, num_prompt, params, block_ids, num_computed, num_new)


def send_to_wire(send: KVSend) -> list:
    t = send.target
    target = [t.protocol, t.peer_key, t.transfer_id, t.peer_num_blocks, t.endpoints]
    return [send.request_id, send.src_block_ids, send.dst_block_ids, target]


def send_from_wire(wire: list) -> KVSend:
    request_id, src_block_ids, dst_block_ids, target = wire
    return KVSend(request_id, src_block_ids, dst_block_ids, KVTarget(*target))
