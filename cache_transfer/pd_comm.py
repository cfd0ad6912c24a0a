"""pd-comm: the gRPC service a decode rank runs on ``--pd-comm-port``, and the client a
prefill rank uses (DESIGN.md "The splitwise request path", steps 3-5).

    prefill                               decode
    Reserve(id, tokens, fingerprint, proto) -> blocks + endpoint, under a lease
    ...writes KV into those blocks over the transfer backend...
    Commit(id, first token, request)     -> the engine adopts the request and its blocks
    Abort(id)                            -> blocks released (any time before Commit)

Every client call has a deadline; failures raise ``PdCommError`` naming the peer,
the call and the gRPC status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures

import grpc

from cache_transfer.endpoints import endpoint_to_proto
from cache_transfer.regions import dst_block_ranges
from cache_transfer.reservations import BlockAllocator, Reservation, Reservations
from cache_transfer.transfer_engine import TransferEngine
from proto import pd_comm_pb2 as pb
from proto import pd_comm_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

Status = pb.ReserveReply.Status
FINGERPRINT_FIELDS = tuple(f.name for f in pb.KvFingerprint.DESCRIPTOR.fields)
# The engine's side of Commit: adopt the request and its blocks into the running batch,
# or raise CommitRefused (the reservation is then released).
OnCommit = Callable[[pb.CommitRequest, list[int]], None]


class CommitRefused(Exception):
    def __init__(self, message: str, aborted: bool = False):
        super().__init__(message)
        self.aborted = aborted  # the owner aborted the request: no point retrying elsewhere


def fingerprint_mismatch(mine: pb.KvFingerprint, theirs: pb.KvFingerprint) -> str | None:
    """None when compatible; else a message naming the first field that differs."""
    for name in FINGERPRINT_FIELDS:
        here, there = getattr(mine, name), getattr(theirs, name)
        if here != there:
            note = " (unequal TP sizes are not supported yet)" if name == "tp_size" else ""
            return f"KV layouts differ in {name}: {there!r} on prefill, {here!r} here{note}"
    return None


class PdCommService(pb_grpc.PdCommServicer):
    def __init__(
        self,
        rank_id: str,
        fingerprint: pb.KvFingerprint,
        allocator: BlockAllocator,
        engines: dict[str, TransferEngine],
        on_commit: OnCommit,
        lease_s: float = 10.0,
    ):
        self.rank_id = rank_id
        self.fingerprint = fingerprint
        self.allocator = allocator
        self.engines = engines
        self.on_commit = on_commit
        self.reservations = Reservations(allocator, lease_s, on_end=self._revoke)

    def _revoke(self, reservation: Reservation) -> None:
        self.engines[reservation.protocol].revoke(reservation.transfer_id)

    def Reserve(self, request: pb.ReserveRequest, context) -> pb.ReserveReply:
        mismatch = fingerprint_mismatch(self.fingerprint, request.fingerprint)
        if mismatch is not None:
            return pb.ReserveReply(status=Status.INCOMPATIBLE, message=mismatch)
        engine = self.engines.get(request.protocol)
        if engine is None:
            return pb.ReserveReply(
                status=Status.UNSUPPORTED_PROTOCOL,
                message=f"{self.rank_id} offers {sorted(self.engines)}, not {request.protocol!r}",
            )
        try:
            reservation = self.reservations.reserve(
                request.request_id, request.num_tokens, request.protocol
            )
        except ValueError as e:
            return pb.ReserveReply(status=Status.DUPLICATE, message=str(e))
        if reservation is None:
            return pb.ReserveReply(
                status=Status.NO_ROOM,
                message=f"{self.rank_id} has {self.allocator.num_free_blocks} free blocks, "
                f"too few for {request.num_tokens} tokens",
            )
        engine.allow(
            reservation.transfer_id, dst_block_ranges(engine.layout, reservation.block_ids)
        )
        endpoints = [endpoint_to_proto(e) for e in engine.endpoints()]
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
                message=f"no reservation for {request.request_id} (transfer "
                f"{request.transfer_id}): never made, aborted, or its lease expired",
            )
        try:
            self.on_commit(request, reservation.block_ids)
        except CommitRefused as refused:
            self.allocator.release(request.request_id)
            return pb.CommitReply(ok=False, message=str(refused), aborted=refused.aborted)
        return pb.CommitReply(ok=True)

    def Abort(self, request: pb.AbortRequest, context) -> pb.AbortReply:
        return pb.AbortReply(released=self.reservations.release(request.request_id))

    def Health(self, request: pb.HealthRequest, context) -> pb.HealthReply:
        return pb.HealthReply(
            rank_id=self.rank_id,
            num_free_blocks=self.allocator.num_free_blocks,
            num_reservations=len(self.reservations),
        )

    def close(self) -> None:
        self.reservations.close()


class PdCommServer:
    """The service on a port (0 = a free one), with a small thread pool."""

    def __init__(self, service: PdCommService, host: str = "0.0.0.0", port: int = 0):
        self.service = service
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_PdCommServicer_to_server(service, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"pd-comm cannot listen on {host}:{port}")
        self.server.start()

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace_s).wait()
        self.service.close()


class PdCommError(RuntimeError):
    """A pd-comm call failed: unreachable peer, deadline exceeded, or a server error."""


class PdCommClient:
    def __init__(self, address: str, timeout_s: float = 5.0):
        self.address = address
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.PdCommStub(self.channel)

    def _call(self, name: str, request, timeout_s: float | None):  # type: ignore[no-untyped-def]
        try:
            return getattr(self.stub, name)(request, timeout=timeout_s or self.timeout_s)
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
