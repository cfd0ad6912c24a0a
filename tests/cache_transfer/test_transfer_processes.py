"""KV transfer between two processes through pd-comm and a real backend: bit-exact
blocks for 32 concurrent requests, refusals, cancellation and a dying prefill rank."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cache_transfer.kv_cluster import DECODE_BLOCKS, DecodeSide, prefill_pool

SENDER = Path(__file__).with_name("kv_sender.py")


def send(address: str, protocol: str, *flags: str) -> list[dict]:
    result = subprocess.run(
        [sys.executable, str(SENDER), address, "--protocol", protocol, *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if result.returncode not in (0, 3):
        raise AssertionError(f"sender failed ({result.returncode}): {result.stderr[-3000:]}")
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(params=["tcp", "ipc"])
def decode(request: pytest.FixtureRequest):
    side = DecodeSide(request.param, lease_s=1.0)
    yield side
    side.close()


def test_32_concurrent_requests_land_bit_exact_and_unmixed(decode: DecodeSide) -> None:
    protocol = next(iter(decode.service.engines))
    results = send(decode.address, protocol, "--requests", "32", "--seed", "5")
    assert [r["status"] for r in results] == ["OK"] * 32
    assert all(r["committed"] for r in results), results
    source = prefill_pool(5)
    for r in results:
        request, block_ids = decode.committed[r["request_id"]]
        assert block_ids == r["dst_blocks"] and request.first_token_id == 7
        assert torch.equal(decode.pool[:, :, block_ids], source[:, :, r["src_blocks"]]), (
            f"{r['request_id']}: blocks differ"
        )
    used = {b for r in results for b in r["dst_blocks"]}
    untouched = sorted(set(range(DECODE_BLOCKS)) - used)
    assert not decode.pool[:, :, untouched].any(), "nothing landed outside reserved blocks"
    decode.allocator.check()
    for request_id in decode.committed:
        decode.allocator.release(request_id)
    assert decode.allocator.num_free_blocks == DECODE_BLOCKS


def test_an_incompatible_layout_is_refused_naming_the_field(decode: DecodeSide) -> None:
    protocol = next(iter(decode.service.engines))
    (result,) = send(decode.address, protocol, "--fingerprint-head-dim", "64")
    assert result["status"] == "INCOMPATIBLE"
    assert "head_dim" in result["message"] and "64" in result["message"]
    assert decode.allocator.num_free_blocks == DECODE_BLOCKS


def test_a_cancelled_transfer_releases_the_decode_blocks(decode: DecodeSide) -> None:
    protocol = next(iter(decode.service.engines))
    results = send(decode.address, protocol, "--requests", "4", "--mode", "cancel")
    assert all(r["released"] for r in results)
    assert decode.allocator.num_free_blocks == DECODE_BLOCKS
    assert len(decode.service.reservations) == 0
    decode.allocator.check()


def test_a_prefill_rank_dying_after_reserve_leaks_nothing(decode: DecodeSide) -> None:
    protocol = next(iter(decode.service.engines))
    send(decode.address, protocol, "--requests", "1", "--mode", "die")
    assert len(decode.service.reservations) == 1
    assert decode.allocator.num_free_blocks < DECODE_BLOCKS
    deadline = time.monotonic() + 3
    while len(decode.service.reservations) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert decode.allocator.num_free_blocks == DECODE_BLOCKS, "the lease released them"
    assert decode.service.reservations.num_expired == 1
