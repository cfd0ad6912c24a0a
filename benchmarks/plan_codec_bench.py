"""What a step plan costs on its way to the TP workers, on this machine's CPU.

Each step the engine core encodes its plan once (msgpack), sends the bytes to every
TP worker over ZMQ, and each worker decodes them. This prints, for typical plans, the
bytes, the encode and decode times, and the time for the bytes to reach another
process and come back (ZMQ over loopback TCP, as the executor uses), next to a
reference measured in the same run: a msgpack round trip of an empty list.

    python benchmarks/plan_codec_bench.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import msgpack
import zmq

from engine.plan_codec import decode_plan, encode_plan
from engine.sampling_params import SamplingParams
from engine.step_plan import KVSend, KVTarget, NewRequest, RunningRequest, StepPlan


def decode_plan_of(batch: int) -> StepPlan:
    """A decode step of ``batch`` running requests, one new block for 1 in 16."""
    return StepPlan(
        running=[
            RunningRequest(f"req-{i}", [1000 + i] if i % 16 == 0 else [], 1) for i in range(batch)
        ]
    )


def prefill_plan_of(count: int, prompt_len: int, block_size: int = 16) -> StepPlan:
    """``count`` new requests of ``prompt_len`` tokens each, prefilled whole."""
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=256, seed=1)
    blocks = -(-prompt_len // block_size)
    return StepPlan(
        new_requests=[
            NewRequest(
                f"req-{i}",
                list(range(prompt_len)),
                prompt_len,
                params,
                list(range(i * blocks, (i + 1) * blocks)),
                0,
                prompt_len,
            )
            for i in range(count)
        ],
        kv_sends=[
            KVSend(f"req-{i}", list(range(blocks)), list(range(blocks)), _target(i))
            for i in range(count)
        ],
    )


def _target(index: int) -> KVTarget:
    """A decode rank of TP 2 reached over tcp."""
    endpoints = [{"protocol": "tcp", "host": "10.0.0.7", "port": 7000 + r} for r in range(2)]
    return KVTarget("tcp", f"decode-{index}/0a1b2c", bytes(16), 4096, endpoints)


def _echo(address: str) -> None:
    socket = zmq.Context().socket(zmq.DEALER)
    socket.connect(address)
    socket.send(b"ready")
    while True:
        frame = socket.recv()
        if frame == b"quit":
            return
        socket.send(frame)


def timed(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of ``fn()``."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind("tcp://127.0.0.1:*")
    echo = multiprocessing.get_context("spawn").Process(
        target=_echo, args=(router.getsockopt_string(zmq.LAST_ENDPOINT),), daemon=True
    )
    echo.start()
    identity, _ = router.recv_multipart()

    def round_trip(data: bytes) -> None:
        router.send_multipart([identity, data])
        router.recv_multipart()

    empty = msgpack.packb([])
    reference = timed(lambda: msgpack.unpackb(msgpack.packb([])), args.repeats)
    zmq_reference = timed(lambda: round_trip(empty), args.repeats)
    print(
        f"reference: msgpack round trip of [] {reference * 1e6:.1f} us; "
        f"ZMQ round trip of 1 byte {zmq_reference * 1e6:.1f} us"
    )
    print(f"{'plan':<34} {'bytes':>9} {'encode us':>10} {'decode us':>10} {'ZMQ rtt us':>11}")
    cases = [
        ("decode, 1 request", decode_plan_of(1)),
        ("decode, 64 requests", decode_plan_of(64)),
        ("decode, 256 requests", decode_plan_of(256)),
        ("prefill, 1 x 4096 tokens", prefill_plan_of(1, 4096)),
        ("prefill, 8 x 512 tokens", prefill_plan_of(8, 512)),
    ]
    for name, plan in cases:
        data = encode_plan(plan)
        assert decode_plan(data) == plan
        encode_s = timed(lambda plan=plan: encode_plan(plan), args.repeats)
        decode_s = timed(lambda data=data: decode_plan(data), args.repeats)
        rtt_s = timed(lambda data=data: round_trip(data), args.repeats)
        print(f"{name:<34} {len(data):>9} {encode_s * 1e6:>10.1f} {decode_s * 1e6:>10.1f} "
              f"{rtt_s * 1e6:>11.1f}")  # fmt: skip
    router.send_multipart([identity, b"quit"])
    echo.join(5)


if __name__ == "__main__":
    main()
