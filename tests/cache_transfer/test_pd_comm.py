"""pd-comm refusals and deadlines (the two-process round trip is in
test_transfer_processes.py)."""

from __future__ import annotations

import socket
import time

import pytest

from cache_transfer.pd_comm import PdCommClient, PdCommError, fingerprint_mismatch
from proto import pd_comm_pb2 as pb
from tests.cache_transfer.kv_cluster import BLOCK_SIZE, DECODE_BLOCKS, DecodeSide, fingerprint

OK, NO_ROOM, DUPLICATE, UNSUPPORTED = (
    pb.ReserveReply.OK, pb.ReserveReply.NO_ROOM, pb.ReserveReply.DUPLICATE,
    pb.ReserveReply.UNSUPPORTED_PROTOCOL,
)  # fmt: skip


@pytest.fixture
def decode():
    side = DecodeSide("tcp", lease_s=0.5)
    yield side
    side.close()


def reserve(client: PdCommClient, side: DecodeSide, request_id: str, num_tokens: int,
            protocol: str = "tcp") -> pb.ReserveReply:  # fmt: skip
    return client.reserve(pb.ReserveRequest(
        request_id=request_id, num_tokens=num_tokens, protocol=protocol,
        fingerprint=fingerprint(side.layout),
    ))  # fmt: skip


def test_refusals_are_typed_and_explained(decode: DecodeSide) -> None:
    client = PdCommClient(decode.address)
    assert reserve(client, decode, "big", DECODE_BLOCKS * BLOCK_SIZE + 1).status == NO_ROOM
    reply = reserve(client, decode, "a", 8)
    assert reply.status == OK and len(reply.block_ids) == 2 and reply.lease_ms == 500
    assert reply.endpoint.WhichOneof("kind") == "tcp"
    assert reserve(client, decode, "a", 8).status == DUPLICATE
    refused = reserve(client, decode, "b", 8, protocol="rdma")
    assert refused.status == UNSUPPORTED and "['tcp']" in refused.message
    health = client.health()
    assert (health.rank_id, health.num_reservations) == ("d0", 1)
    assert health.num_free_blocks == DECODE_BLOCKS - 2
    assert client.abort("a") and not client.abort("a")
    client.close()


def test_commit_after_the_lease_expired_is_refused(decode: DecodeSide) -> None:
    client = PdCommClient(decode.address)
    reply = reserve(client, decode, "slow", 8)
    time.sleep(1.0)
    commit = client.commit(pb.CommitRequest(request_id="slow", transfer_id=reply.transfer_id))
    assert not commit.ok and "lease expired" in commit.message
    assert decode.allocator.num_free_blocks == DECODE_BLOCKS
    assert decode.engine.check_allowed(reply.transfer_id, 0, 1) is not None, "writes refused"
    client.close()


def test_calls_to_an_unreachable_rank_fail_within_their_deadline() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = PdCommClient(f"127.0.0.1:{port}", timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(PdCommError, match=r"pd-comm Health to 127\.0\.0\.1:\d+ failed: "):
        client.health()
    assert time.monotonic() - start < 3
    client.close()


def test_fingerprints_of_other_tp_sizes_match_when_the_heads_do() -> None:
    from tests.cache_transfer.kv_cluster import layout

    mine = fingerprint(layout(8))  # TP 1, 2 KV heads
    assert fingerprint_mismatch(mine, fingerprint(layout(8))) is None
    assert fingerprint_mismatch(mine, fingerprint(layout(8), tp_size=2, num_kv_heads=1)) is None
    assert fingerprint_mismatch(mine, fingerprint(layout(8), tp_size=4, num_kv_heads=1)) is None
    message = fingerprint_mismatch(mine, fingerprint(layout(8), total_kv_heads=4))
    assert message.startswith("KV layouts differ in total_kv_heads: 4 on prefill")
    message = fingerprint_mismatch(mine, fingerprint(layout(8), tp_size=3))
    assert message.startswith("tp_size 3 cannot hold the prefill's KV heads")
    message = fingerprint_mismatch(mine, fingerprint(layout(8), tp_size=2))  # 2 heads each?
    assert message.startswith("num_kv_heads 2 is not what TP 2 gives")
