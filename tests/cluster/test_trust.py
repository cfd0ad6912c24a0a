"""Issue 17's table, replayed against a real 1P1D cluster (real Redis, real pd-serve
processes): what a hostile or buggy peer sends is refused by name, releases what it
held, and leaves the engines alive and the other requests' answers unchanged."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgpack
import openai
import pytest
import redis
import zmq

from pd.args import pick_free_port
from pd.engine_messages import Kind, encode
from proto import cluster_pb2 as cluster_pb
from proto import pd_comm_pb2 as pb
from scheduler.redis_server import EmbeddedRedis
from tests.cluster.cluster import Cluster, wait_blocks_free

pytestmark = pytest.mark.slow

PROMPT = "prefill decode cache block layer token"
SECRET = b"test-cluster-secret-0123456789"
NUM_DECODE_BLOCKS = 16  # x 16 tokens: one max_model_len (256) sequence
SAMPLING = dict(n=1, temperature=0.0, top_p=1.0, max_tokens=4, repetition_penalty=1.0)


class Peer:
    """What a peer on the cluster network can reach: the decode rank's pd-comm service,
    its engine's ZMQ port, and Redis."""

    def __init__(self, cluster: Cluster, prefill, decode, decode_zmq_port: int):  # type: ignore[no-untyped-def]
        from cache_transfer.pd_comm import PdCommClient

        self.cluster, self.prefill, self.decode = cluster, prefill, decode
        self.redis = cluster.redis_client()
        self.decode_rank = cluster.rank_id(decode)
        raw = self.redis.get(cluster.keys.instance("decode", self.decode_rank))
        self.record = cluster_pb.InstanceRecord.FromString(raw)
        self.pd_comm = PdCommClient(f"127.0.0.1:{self.record.pd_comm_port}", secret=SECRET)
        self.zmq_address = f"tcp://127.0.0.1:{decode_zmq_port}"

    def fingerprint(self) -> pb.KvFingerprint:
        layout = self.record.kv_layout
        return pb.KvFingerprint(
            model="tiny", dtype=layout.dtype, block_size=layout.block_size,
            num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim, tp_size=1, tp_rank=0,
            total_kv_heads=layout.num_kv_heads,
        )  # fmt: skip

    def reserve(self, num_tokens: int, **fields) -> tuple[str, pb.ReserveReply]:  # type: ignore[no-untyped-def]
        request_id = f"forged-{uuid.uuid4().hex[:8]}"
        message = pb.ReserveRequest(
            request_id=request_id, num_tokens=num_tokens, fingerprint=self.fingerprint(),
            protocol="tcp", prefill_rank_id="forger",
        )  # fmt: skip
        for name, value in fields.items():
            if name == "fingerprint":
                message.fingerprint.CopyFrom(value)
            else:
                setattr(message, name, value)
        return request_id, self.pd_comm.reserve(message)

    def commit(  # type: ignore[no-untyped-def]
        self, request_id: str, reply: pb.ReserveReply, prompt: list[int],
        first_token_id: int = 5, **sampling,
    ) -> pb.CommitReply:  # fmt: skip
        owner = sampling.pop("owner", "api-forger")
        request = cluster_pb.DispatchedRequest(
            request_id=request_id, owner=owner, prompt_token_ids=prompt,
            sampling=cluster_pb.SamplingParams(**(SAMPLING | sampling)),
            prefill_rank_id="forger", decode_rank_id=self.decode_rank,
        )  # fmt: skip
        return self.pd_comm.commit(pb.CommitRequest(
            request_id=request_id, transfer_id=reply.transfer_id, first_token_id=first_token_id,
            num_computed_tokens=len(prompt), request=request,
        ))  # fmt: skip

    def health(self) -> pb.HealthReply:
        return self.pd_comm.health()

    def assert_released(self, timeout_s: float = 5.0) -> None:
        """Every decode block free again, no reservation left, no stray T:proc entry."""
        deadline = time.monotonic() + timeout_s
        while True:
            health = self.health()
            proc = self.redis.lrange(self.cluster.keys.processing(self.decode_rank), 0, -1)
            if (health.num_free_blocks, health.num_reservations, proc) == (
                NUM_DECODE_BLOCKS,
                0,
                [],
            ):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not released: {health}, T:proc {proc}")
            time.sleep(0.05)

    def assert_alive(self) -> None:
        assert self.decode.process.poll() is None, self.decode.log()[-3000:]
        assert complete(self.prefill) == GREEDY_ANSWER[0]


GREEDY_ANSWER: list[str] = []


def client(server, timeout: float = 60) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=timeout)


def complete(server, prompt: str = PROMPT, max_tokens: int = 8) -> str:  # type: ignore[no-untyped-def]
    reply = client(server).completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    return reply.choices[0].text


@pytest.fixture(scope="module")
def peer(model_dir, tmp_path_factory) -> Iterator[Peer]:  # type: ignore[no-untyped-def]
    """A 1P1D cluster on tcp whose instances and Redis hold SECRET."""
    from pd.cluster_secret import redis_password

    log_dir = tmp_path_factory.mktemp("trust")
    secret_file = log_dir / "cluster.secret"
    secret_file.write_bytes(SECRET)
    with EmbeddedRedis(password=redis_password(SECRET)) as redis_server:
        cluster = Cluster(redis_server, model_dir, log_dir, f"t{uuid.uuid4().hex[:8]}")
        common = ("--cache-transfer-protocol", "tcp", "--cluster-secret-file", str(secret_file))
        prefill = cluster.start("prefill", *common)
        zmq_port = pick_free_port()
        decode = cluster.start(
            "decode", *common, "--engine-worker-queue-port", str(zmq_port),
            "--num-gpu-blocks-override", str(NUM_DECODE_BLOCKS),
        )  # fmt: skip
        GREEDY_ANSWER[:] = [complete(prefill)]
        side = Peer(cluster, prefill, decode, zmq_port)
        yield side
        side.pd_comm.close()
        for server, code in cluster.stop():
            assert code == 0, server.log()[-4000:]
            assert "Traceback" not in server.log(), server.log()[-4000:]


def test_without_the_secret_every_internal_endpoint_refuses(peer: Peer) -> None:
    """Issue 17: pd-comm, the KV port, the engine's ZMQ port and Redis answered anyone."""
    from cache_transfer import tcp
    from cache_transfer.pd_comm import PdCommClient, PdCommError

    stranger = PdCommClient(f"127.0.0.1:{peer.record.pd_comm_port}")
    with pytest.raises(PdCommError, match="UNAUTHENTICATED"):
        stranger.reserve(pb.ReserveRequest(request_id="x", num_tokens=4))
    wrong = PdCommClient(f"127.0.0.1:{peer.record.pd_comm_port}", secret=b"w" * 32)
    with pytest.raises(PdCommError, match="UNAUTHENTICATED"):
        wrong.health()
    stranger.close(), wrong.close()

    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=peer.cluster.redis.port).ping()

    request_id, reply = peer.reserve(4)  # where the KV port is (a peer with the secret)
    address = (reply.endpoint.tcp.host, reply.endpoint.tcp.port)
    with socket.create_connection(address, timeout=5) as sock:
        assert len(sock.recv(64)) == 16, "a challenge comes first"
        sock.sendall(b"\0" * 48)  # a wrong answer
        frame = tcp.HEADER.pack(tcp.MAGIC, tcp.DATA, reply.transfer_id, 0, 8)
        with contextlib.suppress(OSError):
            sock.sendall(frame + b"x" * 8)
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:  # closed with our frame unread
            closed = True
        assert closed, "closed without reading a frame"
    assert peer.pd_comm.abort(request_id)

    context = zmq.Context()
    socket_ = context.socket(zmq.DEALER)
    socket_.setsockopt(zmq.LINGER, 0)
    socket_.connect(peer.zmq_address)
    socket_.send(encode(Kind.HELLO, "0" * 64))
    socket_.send(encode(Kind.SHUTDOWN))
    assert not socket_.poll(1000), "no READY for a HELLO without the key"
    socket_.close()
    context.term()
    assert "before an accepted HELLO" in peer.decode.log()
    peer.assert_released()
    peer.assert_alive()


def test_forged_kv_writes_change_no_other_request(peer: Peer) -> None:
    """Issue 17: a forger wrote into 63 transfers of other requests; 58 of 1,682 greedy
    answers changed. Now a forger holding the secret, writing to every transfer id it
    can name (its own, outside its blocks, and guessed ones), lands nothing."""
    from cache_transfer import tcp
    from cache_transfer.auth import respond

    request_id, reply = peer.reserve(4)
    address = (reply.endpoint.tcp.host, reply.endpoint.tcp.port)
    stop = threading.Event()
    refusals: list[bytes] = []

    def forge() -> None:
        rng = random.Random(3)
        with socket.create_connection(address, timeout=10) as sock:
            respond(sock, SECRET, tcp.AUTH_PURPOSE, b"forger-session!!")
            seq = 0
            while not stop.is_set():
                guess = rng.randbytes(16)
                offset = rng.randrange(0, 1 << 24)
                for transfer_id in (guess, reply.transfer_id):
                    frame = tcp.HEADER.pack(tcp.MAGIC, tcp.DATA, transfer_id, offset, 4096)
                    sock.sendall(frame + b"\xff" * 4096)
                    seq += 1
                    sock.sendall(tcp.HEADER.pack(tcp.MAGIC, tcp.SYNC, transfer_id, seq, 0))
                    answer = bytearray(tcp.HEADER.size)
                    tcp.recv_exact(sock, memoryview(answer))
                    *_, nbytes = tcp.HEADER.unpack(answer)
                    reason = bytearray(nbytes)
                    tcp.recv_exact(sock, memoryview(reason))
                    refusals.append(bytes(reason))

    forger = threading.Thread(target=forge)
    forger.start()
    deadline = time.monotonic() + 10
    while len(refusals) < 4:  # forging before the requests start
        assert time.monotonic() < deadline and forger.is_alive()
        time.sleep(0.01)
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: complete(peer.prefill), range(16)))
    finally:
        stop.set()
        forger.join(timeout=10)
    assert answers == GREEDY_ANSWER * 16
    assert all(refusals), "every forged frame was refused"
    assert peer.pd_comm.abort(request_id)
    peer.assert_released()


def test_commit_with_a_token_id_beyond_the_vocabulary_is_refused(peer: Peer) -> None:
    request_id, reply = peer.reserve(4)
    assert reply.status == pb.ReserveReply.OK
    commit = peer.commit(request_id, reply, [1, 2, 3, 4], first_token_id=100_000)
    assert not commit.ok and "first_token_id" in commit.message
    peer.assert_released()
    peer.assert_alive()


def test_commit_that_does_not_match_its_reservation_releases_every_block(peer: Peer) -> None:
    request_id, reply = peer.reserve(NUM_DECODE_BLOCKS * peer.record.kv_layout.block_size - 1)
    assert reply.status == pb.ReserveReply.OK, reply.message
    assert peer.health().num_free_blocks == 0
    commit = peer.commit(request_id, reply, [1, 2, 3, 4])
    assert not commit.ok and "prompt_token_ids" in commit.message
    peer.assert_released()
    for key in peer.redis.scan_iter(match=f"{peer.cluster.topic}:*"):
        kind = key.decode().split(":")[1]
        if kind not in ("req", "proc", "ctl", "reaper"):  # rank-held lists live with the rank
            assert peer.redis.pttl(key) > 0, f"{key!r} has no TTL"
    peer.assert_alive()


@pytest.mark.parametrize(
    "field, value",
    [("logprobs", 21), ("n", 3), ("min_p", 1.5), ("top_p", 0.0), ("owner", "a b:c")],
)
def test_commit_with_bad_sampling_values_is_refused_by_name(peer: Peer, field, value) -> None:  # type: ignore[no-untyped-def]
    request_id, reply = peer.reserve(4)
    commit = peer.commit(request_id, reply, [1, 2, 3, 4], **{field: value})
    assert not commit.ok and field in commit.message, commit.message
    peer.assert_released()
    assert peer.decode.process.poll() is None


def test_reserve_with_an_empty_fingerprint_names_the_field_not_our_layout(peer: Peer) -> None:
    _, reply = peer.reserve(4, fingerprint=pb.KvFingerprint())
    assert reply.status == pb.ReserveReply.INCOMPATIBLE
    assert "model" in reply.message and "tiny" not in reply.message, reply.message
    assert peer.record.kv_layout.dtype not in reply.message
    for name, value in [("num_tokens", 0), ("num_tokens", 2**32 - 1), ("request_id", "a b\n")]:
        _, refused = peer.reserve(**{"num_tokens": 4, name: value})
        assert refused.status != pb.ReserveReply.OK, (name, value)
        assert name in refused.message, refused.message
    peer.assert_released()


def test_one_peer_cannot_book_every_block(peer: Peer) -> None:
    block_size = peer.record.kv_layout.block_size
    first_id, first = peer.reserve(block_size * NUM_DECODE_BLOCKS // 2)
    assert first.status == pb.ReserveReply.OK
    second_id, second = peer.reserve(block_size * NUM_DECODE_BLOCKS // 2)
    assert second.status == pb.ReserveReply.NO_ROOM and "at most" in second.message
    assert complete(peer.prefill) == GREEDY_ANSWER[0]  # another peer still gets blocks
    assert peer.pd_comm.abort(first_id) and not peer.pd_comm.abort(second_id)
    peer.assert_released()


def test_garbage_frames_to_the_engine_port_do_not_kill_it(peer: Peer) -> None:
    """Issue 17: one garbage frame to the engine's ZMQ port killed the engine. Fuzzed
    frames before and after a HELLO that proves the channel key: dropped or refused."""
    from pd.cluster_secret import engine_channel_key
    from pd.engine_messages import AddRequest, decode, hello_token

    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(peer.zmq_address)
    rng = random.Random(17)
    frames = [b"\xc1", b"", b"\x92\x02\xc0", encode(Kind.ABORT, [1, 2]), b"\x92\x63\x90"]
    frames += [msgpack.packb([2, None]), msgpack.packb([2, ["x", [1], {"bogus": 1}]])]
    frames += [json.dumps({"kind": 2}).encode()]
    frames += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(200)]
    good = encode(Kind.ABORT, ["nothing"])
    frames += [_mutate(good, rng) for _ in range(200)]
    for frame in frames:
        socket.send(frame)
    socket.send_multipart([b"a", b"b", b"c"])
    identity = b"fuzzer-0001"
    socket.close()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.IDENTITY, identity)
    socket.connect(peer.zmq_address)
    socket.send(encode(Kind.HELLO, hello_token(engine_channel_key(SECRET), identity)))
    assert socket.poll(10_000), "READY for a HELLO with the key"
    assert decode(socket.recv())[0] is Kind.READY
    from engine.sampling_params import SamplingParams

    add = encode(Kind.ADD, AddRequest("fz-1", [1, 2, 3], SamplingParams(max_tokens=2)))
    for frame in [_mutate(add, rng) for _ in range(200)] + [_mutate(good, rng) for _ in range(50)]:
        socket.send(frame)
    time.sleep(1.0)
    socket.close()
    context.term()
    assert "dropped a malformed engine message" in peer.decode.log()
    peer.assert_released()
    peer.assert_alive()


def _mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randrange(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def test_pd_comm_fuzz_leaves_the_cluster_alive_and_leak_free(peer: Peer) -> None:
    """Random and mutated Reserve/Commit/Abort messages, a bounded count."""
    import grpc

    from cache_transfer.auth import PD_AUTH_HEADER, bearer_token

    rng = random.Random(1717)
    metadata = ((PD_AUTH_HEADER, bearer_token(SECRET, "pd-comm")),)
    channel = grpc.insecure_channel(f"127.0.0.1:{peer.record.pd_comm_port}")
    calls = {
        name: channel.unary_unary(f"/pd.comm.PdComm/{name}", lambda b: b, lambda b: b)
        for name in ("Reserve", "Commit", "Abort", "Health")
    }
    request_id, reply = peer.reserve(8)
    valid = {
        "Reserve": pb.ReserveRequest(request_id="fz", num_tokens=8, protocol="tcp",
                                     fingerprint=peer.fingerprint()).SerializeToString(),
        "Commit": pb.CommitRequest(
            request_id=request_id, transfer_id=reply.transfer_id, num_computed_tokens=8,
            first_token_id=3, request=cluster_pb.DispatchedRequest(
                request_id=request_id, owner="api-fz", prompt_token_ids=list(range(1, 9)),
                sampling=cluster_pb.SamplingParams(**SAMPLING), prefill_rank_id="fz",
            ),
        ).SerializeToString(),
        "Abort": pb.AbortRequest(request_id="fz").SerializeToString(),
    }  # fmt: skip
    statuses: set[str] = set()
    for i in range(300):
        name = rng.choice(list(valid))
        if i % 3 == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
        else:
            body = _mutate(valid[name], rng)
        try:
            calls[name](body, timeout=5, metadata=metadata)
            statuses.add("OK")
        except grpc.RpcError as e:
            statuses.add(e.code().name)
            assert e.code() != grpc.StatusCode.UNKNOWN or "Exception" not in (e.details() or "")
    channel.close()
    assert {"OK", "INVALID_ARGUMENT"} <= statuses, statuses  # handlers ran; garbage refused
    peer.pd_comm.abort(request_id)
    peer.pd_comm.abort("fz")
    for _ in range(30):  # anything a mutated Reserve booked ends with its lease at worst
        if peer.health().num_reservations == 0:
            break
        time.sleep(0.5)
    peer.assert_released(timeout_s=15)
    peer.assert_alive()
    assert "Traceback" not in peer.decode.log()


def test_abort_pushed_through_redis_ends_the_stream_with_an_error_event(peer: Peer) -> None:
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "stream": True,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", f"{peer.prefill.base_url}/completions", json=body,
                          timeout=60) as response:  # fmt: skip
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(30)
    running = _running_request_ids(peer)
    assert running, "the stream's request is on the decode rank"
    control = cluster_pb.ControlMessage(schema_version=1, abort_request_ids=running)
    peer.redis.rpush(peer.cluster.keys.control(peer.decode_rank), control.SerializeToString())
    thread.join(timeout=10)
    assert not thread.is_alive(), "the stream ended"
    assert events[-1] == "[DONE]"
    assert "error" in json.loads(events[-2]), events[-2]
    wait_blocks_free([peer.prefill, peer.decode], timeout_s=10)


def _running_request_ids(peer: Peer) -> list[str]:
    proc = peer.redis.lrange(peer.cluster.keys.processing(peer.decode_rank), 0, -1)
    return [cluster_pb.DispatchedRequest.FromString(e).request_id for e in proc]


def test_requests_right_after_a_redis_restart_wait_for_the_ranks(peer: Peer) -> None:
    """Issue 17: requests in the seconds after a Redis restart failed 503 until the ranks
    re-registered; now they wait for them (bounded). Last in the module: it restarts the
    module's Redis."""
    server = peer.cluster.redis
    server.kill()
    server.start()
    assert complete(peer.prefill) == GREEDY_ANSWER[0]
