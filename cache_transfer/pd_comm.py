"""pd-comm: the gRPC service a decode rank runs on ``--pd-comm-port``, and the client a
prefill rank uses (DESIGN.md "The splitwise request path", steps 3-5).

    prefill                               decode
    Reserve(id, tokens, fingerprint, proto) -> blocks + endpoint, under a lease
    ...writes KV into those blocks over the transfer backend...
    Commit(id, first token, request)     -> the engine adopts the request and its blocks
    Abort(id)                            -> blocks released (any time before Commit);
                                            paired by the router, also the committed
                                            request stopped (its owner's abort)

Every client call has a deadline; failures raise ``PdCommError`` naming the peer,
the call and the gRPC status.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError

from cache_transfer.auth import PD_AUTH_HEADER, bearer_token, check_token
from cache_transfer.endpoints import endpoint_to_proto
from cache_transfer.regions import dst_block_ranges
from cache_transfer.reservations import BlockAllocator, PeerLimit, Reservation, Reservations
from cache_transfer.tp_heads import rank_heads
from cache_transfer.transfer_engine import TransferEngine
from proto import pd_comm_pb2 as pb
from proto import pd_comm_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

Status = pb.ReserveReply.Status
FINGERPRINT_FIELDS = tuple(f.name for f in pb.KvFingerprint.DESCRIPTOR.fields)
# Per TP rank: they may differ between instances of different TP sizes (tp_heads maps
# the heads); total_kv_heads and the rest must match.
_PER_RANK_FIELDS = ("num_kv_heads", "tp_size", "tp_rank")
# The engine's side of Commit: adopt the request and its blocks into the running batch,
# or raise CommitRefused (the reservation is then released).
OnCommit = Callable[[pb.CommitRequest, list[int]], None]


# Request ids become Redis keys' parts and log lines: plain and short (scheduler.config's rule).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


class CommitRefused(Exception):
    def __init__(self, message: str, aborted: bool = False):
        super().__init__(message)
        self.aborted = aborted  # the owner aborted the request: no point retrying elsewhere


def fingerprint_mismatch(mine: pb.KvFingerprint, theirs: pb.KvFingerprint) -> str | None:
    """None when compatible; else a message naming the first field that differs and the
    value the prefill rank sent. NOTE: never our own values: a refusal tells a peer what
    it got wrong, not this rank's configuration."""
    for name in FINGERPRINT_FIELDS:
        if name in _PER_RANK_FIELDS:
            continue
        here, there = getattr(mine, name), getattr(theirs, name)
        if here != there:
            shown = repr(there) if len(repr(there)) <= 64 else f"{repr(there)[:64]}..."
            return f"KV layouts differ in {name}: {shown} on prefill does not match"
    try:  # the prefill's TP layout must be one its model can have
        heads = rank_heads(theirs.total_kv_heads, theirs.tp_size, theirs.tp_rank)
    except ValueError as e:
        return f"tp_size {theirs.tp_size} cannot hold the prefill's KV heads: {e}"
    if theirs.num_kv_heads != len(heads):
        return (
            f"num_kv_heads {theirs.num_kv_heads} is not what TP {theirs.tp_size} gives a rank "
            f"of {theirs.total_kv_heads} KV heads"
        )
    return None


def check_request_id(request_id: str) -> str | None:
    if _REQUEST_ID.fullmatch(request_id):
        return None
    return "request_id must be 1-128 characters of A-Z a-z 0-9 . _ -"


class PdCommService(pb_grpc.PdCommServicer):
    """Every field a peer sends is checked before it is used; a bad one gets a refusal
    naming the field, and a handler that fails for any reason releases what the call
    held (a refused or failed Commit gives its reservation's blocks back)."""

    def __init__(
        self,
        rank_id: str,
        fingerprint: pb.KvFingerprint,
        allocator: BlockAllocator,
        engines: dict[str, TransferEngine],
        on_commit: OnCommit,
        lease_s: float = 10.0,
        max_num_tokens: int = 1 << 20,
        max_peer_fraction: float = 0.75,
        on_abort: Callable[[str], None] | None = None,
    ):
        self.rank_id = rank_id
        self.fingerprint = fingerprint
        self.allocator = allocator
        self.engines = engines
        self.on_commit = on_commit
        self.on_abort = on_abort  # also told of every Abort (a committed request's owner)
        self.max_num_tokens = max_num_tokens  # a prompt longer than this is never served
        self.reservations = Reservations(
            allocator, lease_s, on_end=self._revoke, max_peer_fraction=max_peer_fraction
        )
        self.num_refused = 0  # bad messages and failed handlers, for tests and metrics
        self.draining = False  # stopping: no new reservations (Commits of earlier ones land)

    def _revoke(self, reservation: Reservation) -> None:
        self.engines[reservation.protocol].revoke(reservation.transfer_id)

    def Reserve(self, request: pb.ReserveRequest, context) -> pb.ReserveReply:
        why = check_request_id(request.request_id)
        if why is None and not 0 < request.num_tokens <= self.max_num_tokens:
            why = f"num_tokens must be in [1, {self.max_num_tokens}]"
        if why is None:
            why = check_request_id(request.prefill_rank_id or "-")
            why = why and why.replace("request_id", "prefill_rank_id")
        if why is not None:
            self.num_refused += 1
            return pb.ReserveReply(status=Status.INCOMPATIBLE, message=why)
        mismatch = fingerprint_mismatch(self.fingerprint, request.fingerprint)
        if mismatch is not None:
            return pb.ReserveReply(status=Status.INCOMPATIBLE, message=mismatch)
        if self.draining:
            return pb.ReserveReply(status=Status.NO_ROOM, message=f"{self.rank_id} is stopping")
        engine = self.engines.get(request.protocol)
        if engine is None:
            return pb.ReserveReply(
                status=Status.UNSUPPORTED_PROTOCOL,
                message=f"{self.rank_id} offers {sorted(self.engines)}, not "
                f"{request.protocol[:32]!r}",
            )
        try:
            reservation = self.reservations.reserve(
                request.request_id, request.num_tokens, request.protocol, request.prefill_rank_id
            )
        except ValueError as e:
            return pb.ReserveReply(status=Status.DUPLICATE, message=str(e))
        except PeerLimit as e:
            return pb.ReserveReply(status=Status.NO_ROOM, message=str(e))
        if reservation is None:
            return pb.ReserveReply(
                status=Status.NO_ROOM,
                message=f"{self.rank_id} has {self.allocator.num_free_blocks} free blocks, "
                f"too few for {request.num_tokens} tokens",
            )
        try:
            engine.allow(
                reservation.transfer_id, dst_block_ranges(engine.layout, reservation.block_ids)
            )
            endpoints = [endpoint_to_proto(e) for e in engine.endpoints()]
        except Exception:
            self.reservations.release(request.request_id)
            raise
        return pb.ReserveReply(
            status=Status.OK,
            transfer_id=reservation.transfer_id,
            block_ids=reservation.block_ids,
            endpoint=endpoints[0],
            endpoints=endpoints,
            lease_ms=int(self.reservations.lease_s * 1000),
        )

    def Commit(self, request: pb.CommitRequest, context) -> pb.CommitReply:
        reservation = self.reservations.take(request.request_id, request.transfer_id)
        if reservation is None:
            return pb.CommitReply(
                ok=False,
                message=f"no reservation for {request.request_id[:128]!r} with that transfer "
                "id: never made, aborted, or its lease expired",
            )
        # From here the blocks are ours to hand over or give back, whatever happens.
        try:
            why = commit_mismatch(request, reservation)
            if why is not None:
                raise CommitRefused(why)
            self.on_commit(request, reservation.block_ids)
        except CommitRefused as refused:
            self.num_refused += 1
            self.allocator.release(request.request_id)
            return pb.CommitReply(ok=False, message=str(refused), aborted=refused.aborted)
        except Exception as e:
            self.num_refused += 1
            self.allocator.release(request.request_id)
            logger.exception("pd-comm: Commit of %s failed; blocks released", request.request_id)
            return pb.CommitReply(ok=False, message=f"{self.rank_id} could not commit: {e}")
        return pb.CommitReply(ok=True)

    def Abort(self, request: pb.AbortRequest, context) -> pb.AbortReply:
        released = self.reservations.release(request.request_id)
        if self.on_abort is not None and check_request_id(request.request_id) is None:
            self.on_abort(request.request_id)
        return pb.AbortReply(released=released)

    def Health(self, request: pb.HealthRequest, context) -> pb.HealthReply:
        return pb.HealthReply(
            rank_id=self.rank_id,
            num_free_blocks=self.allocator.num_free_blocks,
            num_reservations=len(self.reservations),
        )

    def close(self) -> None:
        self.reservations.close()


def commit_mismatch(commit: pb.CommitRequest, reservation: Reservation) -> str | None:
    """Why a Commit does not match its reservation (a field named), or None."""
    request = commit.request
    if request.request_id != commit.request_id:
        return "request.request_id differs from request_id"
    if len(request.prompt_token_ids) != reservation.num_tokens:
        return (
            f"request.prompt_token_ids has {len(request.prompt_token_ids)} tokens; "
            f"{reservation.num_tokens} were reserved"
        )
    if commit.num_computed_tokens != reservation.num_tokens:
        return (
            f"num_computed_tokens is {commit.num_computed_tokens}; "
            f"{reservation.num_tokens} were reserved"
        )
    return None


# Each method: its request type (parsed here: a frame that is not one is refused with
# INVALID_ARGUMENT before any handler runs, and grpc logs no traceback for it).
_METHODS = {
    "Reserve": (pb.ReserveRequest, pb.ReserveReply),
    "Commit": (pb.CommitRequest, pb.CommitReply),
    "Abort": (pb.AbortRequest, pb.AbortReply),
    "Health": (pb.HealthRequest, pb.HealthReply),
}


class _Unparsable:
    """What the parser hands a handler for bytes that are not its message. NOTE: not
    None: grpc answers INTERNAL itself for a deserializer that returns None."""


_UNPARSABLE = _Unparsable()


def _lenient_parser(kind):  # type: ignore[no-untyped-def]
    def parse(raw: bytes):  # type: ignore[no-untyped-def]
        try:
            return kind.FromString(raw)
        except DecodeError:
            return _UNPARSABLE

    return parse


class PdCommServer:
    """The service on a port (0 = a free one), with a small thread pool. Every call is
    guarded: an unparsable message is refused, and a handler that raises answers
    INTERNAL with a one-line reason (the service has released what it held)."""

    def __init__(
        self,
        service: PdCommService,
        host: str = "0.0.0.0",
        port: int = 0,
        secret: bytes | None = None,
    ):
        self.service = service
        self.secret = secret  # the cluster secret: calls without its token are refused
        self.num_unauthenticated = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._guard(name, request_type),
                request_deserializer=_lenient_parser(request_type),
                response_serializer=reply_type.SerializeToString,
            )
            for name, (request_type, reply_type) in _METHODS.items()
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("pd.comm.PdComm", handlers),)
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"pd-comm cannot listen on {host}:{port}")
        self.server.start()

    def _guard(self, name: str, request_type):  # type: ignore[no-untyped-def]
        handler = getattr(self.service, name)

        def call(request, context):  # type: ignore[no-untyped-def]
            if self.secret is not None:
                presented = dict(context.invocation_metadata()).get(PD_AUTH_HEADER)
                if not check_token(self.secret, "pd-comm", presented):
                    self.num_unauthenticated += 1
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "cluster secret required")
            if request is _UNPARSABLE:
                self.service.num_refused += 1
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"not a {request_type.DESCRIPTOR.name}"
                )
            try:
                return handler(request, context)
            except Exception as e:
                self.service.num_refused += 1
                logger.warning("pd-comm %s failed: %s: %s", name, type(e).__name__, e)
                context.abort(grpc.StatusCode.INTERNAL, f"{name} failed: {type(e).__name__}")

        return call

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace_s).wait()
        self.service.close()


class PdCommError(RuntimeError):
    """A pd-comm call failed: unreachable peer, deadline exceeded, or a server error."""


class PdCommClient:
    def __init__(self, address: str, timeout_s: float = 5.0, secret: bytes | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = (
            None if secret is None else ((PD_AUTH_HEADER, bearer_token(secret, "pd-comm")),)
        )
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.PdCommStub(self.channel)

    def _call(self, name: str, request, timeout_s: float | None):  # type: ignore[no-untyped-def]
        try:
            return getattr(self.stub, name)(
                request, timeout=timeout_s or self.timeout_s, metadata=self.metadata
            )
        except grpc.RpcError as e:
            raise PdCommError(
                f"pd-comm {name} to {self.address} failed: {e.code().name}: {e.details()}"
            ) from None

    def reserve(
        self, request: pb.ReserveRequest, timeout_s: float | None = None
    ) -> pb.ReserveReply:
        return self._call("Reserve", request, timeout_s)

    def commit(self, request: pb.CommitRequest, timeout_s: float | None = None) -> pb.CommitReply:
        return self._call("Commit", request, timeout_s)

    def abort(self, request_id: str, timeout_s: float | None = None) -> bool:
        return self._call("Abort", pb.AbortRequest(request_id=request_id), timeout_s).released

    def health(self, timeout_s: float | None = None) -> pb.HealthReply:
        return self._call("Health", pb.HealthRequest(), timeout_s)

    def close(self) -> None:
        self.channel.close()
