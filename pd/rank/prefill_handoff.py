"""A prefill rank's side of the KV hand-off (DESIGN.md steps 3-5) for each request it
prefills for a decode rank:

    reserve   (worker thread)  Reserve on the dispatched decode rank; refused or
                               unreachable -> one other decode rank from the registry
                               (none when the router paired it: PairedDecodes); no room
                               anywhere -> wait, bounded
    prefill   (engine loop)    the step plans carry the sends: each TP rank writes its
                               heads of each layer's finished blocks into the decode TP
                               rank(s) holding them as soon as the layer's K/V are in
                               the cache (``pd.rank.rank_transfer``)
    commit    (worker thread)  flush (every TP rank reports its writes), then
                               Commit(first token); a failed transfer or Commit ->
                               everything again on one other decode rank, from the
                               parked blocks; then a clear error

Worker threads never touch the engine: they post their outcome to the loop
(``LoopCalls``). A request's blocks stay parked in the engine until its hand-off ends,
so no write ever reads a block that was given to another request.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cache_transfer.endpoints import endpoint_from_proto
from cache_transfer.pd_comm import PdCommClient, PdCommError
from engine.kv_cache import KVCacheLayout
from engine.outputs import EngineCoreOutput
from engine.scheduler import ScheduledSequence
from engine.step_plan import KVSend, KVTarget
from pd.cluster_wire import layout_from_proto
from pd.rank.kv_group import PrefillWrites
from pd.rank.loop_calls import LoopCalls
from pd.rank.paired_decodes import PairedDecodes
from proto import cluster_pb2 as cluster_pb
from proto import pd_comm_pb2 as pb
from scheduler.dispatch_policy import RankLoad, pick_decode, transfer_protocol
from scheduler.redis_link import SchedulerUnavailable
from scheduler.registry import RegistryReader, rank_view

logger = logging.getLogger(__name__)

MAX_DECODE_RANKS = 2  # the dispatched one, then one other (issue: "retried ... once")
NO_ROOM_WAIT_S = 5.0  # how long to keep asking when every decode rank is full
_NO_ROOM_PAUSE_S = 0.1
_REPORT_GRACE_S = 5.0  # past the ranks' own write timeout, for their reports to arrive


class HandoffFailed(RuntimeError):
    """No decode rank took the request; the message says what each one answered."""


@dataclass(frozen=True)
class DecodePeer:
    rank_id: str
    address: str  # host:pd-comm port
    protocol: str
    layout: KVCacheLayout


@dataclass
class Handoff:
    """One request's KV on its way to a decode rank."""

    request: cluster_pb.DispatchedRequest
    peer: DecodePeer
    target: KVTarget  # the peer's blocks and endpoints (one per TP rank), its transfer id
    dst_blocks: list[int]
    tried: list[str]  # decode rank ids asked so far, with what they answered
    reasons: list[str] = field(default_factory=list)
    num_sent_blocks: int = 0  # blocks of the prompt already in a step's sends
    aborted: bool = False  # the owner aborted: end with Abort, never Commit
    src_blocks: list[int] = field(default_factory=list)  # set once parked
    first_output: EngineCoreOutput | None = None  # the first token, sent once committed

    @property
    def finished(self) -> bool:
        """The first token ended the request: nothing to commit."""
        return self.first_output is not None and self.first_output.finished

    @property
    def first_token(self) -> int:
        assert self.first_output is not None
        return self.first_output.new_token_ids[0]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def transfer_id(self) -> bytes:
        return self.target.transfer_id


class PrefillHandoff:
    def __init__(
        self,
        record: cluster_pb.InstanceRecord,
        writes: PrefillWrites,
        layout: KVCacheLayout,
        fingerprint: pb.KvFingerprint,
        registry: RegistryReader | PairedDecodes,
        calls: LoopCalls,
        on_reserved: Callable[[Handoff], None],
        on_reserve_failed: Callable[[cluster_pb.DispatchedRequest, str], None],
        on_done: Callable[[Handoff, str | None], None],
        timeout_s: float,
        secret: bytes | None = None,
    ):
        self.secret = secret  # proves this rank to decode ranks' pd-comm
        self.rank_id = record.rank_id
        self.me = rank_view(record)
        self.writes = writes
        self.layout = layout
        self.fingerprint = fingerprint
        self.registry = registry
        self.calls = calls
        self.on_reserved = on_reserved
        self.on_reserve_failed = on_reserve_failed
        self.on_done = on_done
        self.timeout_s = timeout_s
        self.rng = random.Random()
        self.workers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kv-handoff")
        self._clients: dict[str, PdCommClient] = {}
        # [kind, protocol, bytes, seconds] for metrics (engine_messages.KV_EVENT_KINDS);
        # appended by workers, drained by the loop
        self.events: collections.deque[list] = collections.deque(maxlen=10_000)
        self._lock = threading.Lock()  # pd-comm clients

    # -- reserve (worker) ------------------------------------------------------------

    def reserve(self, request: cluster_pb.DispatchedRequest) -> None:
        self.workers.submit(self._reserve_job, request)

    def _reserve_job(self, request: cluster_pb.DispatchedRequest) -> None:
        try:
            handoff = self._reserve_somewhere(request, tried=[], reasons=[])
        except Exception as e:  # a bug, too, must not leave the request hanging
            if not isinstance(e, HandoffFailed):
                logger.exception("reserving for %s failed", request.request_id)
            message = str(e) if isinstance(e, HandoffFailed) else f"internal error: {e}"
            self.calls.post(lambda: self.on_reserve_failed(request, message))
        else:
            self.calls.post(lambda: self.on_reserved(handoff))

    def _reserve_somewhere(
        self, request: cluster_pb.DispatchedRequest, tried: list[str], reasons: list[str]
    ) -> Handoff:
        deadline = time.monotonic() + NO_ROOM_WAIT_S
        while True:
            rank_id = self._next_decode(request, tried)
            if rank_id is None:
                all_full = reasons and all("(no room)" in r for r in reasons[-len(tried) :])
                if all_full and time.monotonic() < deadline:  # wait, bounded
                    time.sleep(_NO_ROOM_PAUSE_S)
                    tried.clear()
                    continue
                raise HandoffFailed(
                    f"no decode rank took request {request.request_id}: "
                    + ("; ".join(reasons) or "none is registered")
                )
            if tried:
                self.events.append(["redispatched", "", 0, 0.0])
            tried.append(rank_id)
            try:
                return self._reserve_on(request, rank_id, tried, reasons)
            except HandoffFailed as e:
                reasons.append(str(e))
                logger.warning("%s: %s", self.rank_id, e)

    def _next_decode(self, request: cluster_pb.DispatchedRequest, tried: list[str]) -> str | None:
        if len(tried) >= MAX_DECODE_RANKS:
            return None
        if not tried and request.decode_rank_id:
            return request.decode_rank_id
        try:
            snapshot = self.registry.snapshot()
        except SchedulerUnavailable:
            return None
        decodes = [r for r in snapshot if r.role == "decode" and r.rank_id not in tried]
        decode = pick_decode(self.me, decodes, len(request.prompt_token_ids), self.rng)
        return None if decode is None else decode.rank_id

    def _peer(self, rank_id: str) -> DecodePeer:
        record = self.registry.record(rank_id)
        if record is None:
            self.registry.snapshot(max_age_s=0)
            record = self.registry.record(rank_id)
        if record is None:
            raise HandoffFailed(f"decode rank {rank_id} is not registered (gone?)")
        decode: RankLoad = rank_view(record)
        protocol = transfer_protocol(self.me, decode)
        if protocol is None:
            raise HandoffFailed(f"decode rank {rank_id} shares no KV-transfer protocol with us")
        return DecodePeer(
            rank_id, f"{record.host}:{record.pd_comm_port}", protocol,
            layout_from_proto(record.kv_layout),
        )  # fmt: skip

    def _client(self, address: str) -> PdCommClient:
        with self._lock:
            if address not in self._clients:
                self._clients[address] = PdCommClient(address, timeout_s=5.0, secret=self.secret)
            return self._clients[address]

    def _reserve_on(
        self,
        request: cluster_pb.DispatchedRequest,
        rank_id: str,
        tried: list[str],
        reasons: list[str],
    ) -> Handoff:
        peer = self._peer(rank_id)
        try:
            reply = self._client(peer.address).reserve(
                pb.ReserveRequest(
                    request_id=request.request_id,
                    num_tokens=len(request.prompt_token_ids),
                    fingerprint=self.fingerprint,
                    protocol=peer.protocol,
                    prefill_rank_id=self.rank_id,
                )
            )
        except PdCommError as e:
            raise HandoffFailed(f"decode rank {rank_id}: {e}") from None
        if reply.status != pb.ReserveReply.OK:
            self.events.append(["reserve_refused", peer.protocol, 0, 0.0])
            status = pb.ReserveReply.Status.Name(reply.status).lower().replace("_", " ")
            raise HandoffFailed(f"decode rank {rank_id} refused ({status}): {reply.message}")
        try:
            target = self._target(peer, reply)
            self.writes.connect(target)
        except Exception as e:  # a bad reply, or a peer rank we cannot reach
            self._abort_quietly(peer, request.request_id)
            raise HandoffFailed(f"decode rank {rank_id}: {e}") from None
        request.decode_rank_id = rank_id
        request.protocol = peer.protocol
        return Handoff(request, peer, target, list(reply.block_ids), tried, reasons)

    def _target(self, peer: DecodePeer, reply: pb.ReserveReply) -> KVTarget:
        """Where the KV goes: the decode rank's TP ranks, one endpoint each (each of our
        TP ranks writes the heads each of them needs, pd.rank.rank_transfer)."""
        endpoints = list(reply.endpoints) or [reply.endpoint]
        digest = hashlib.blake2b(digest_size=6)
        for endpoint in endpoints:
            digest.update(endpoint.SerializeToString())
        return KVTarget(
            protocol=peer.protocol,
            peer_key=f"{peer.rank_id}/{digest.hexdigest()}",  # a restarted rank is a new peer
            transfer_id=reply.transfer_id,
            peer_num_blocks=peer.layout.num_blocks,
            endpoints=[endpoint_from_proto(e) for e in endpoints],
        )

    def _abort_quietly(self, peer: DecodePeer, request_id: str) -> None:
        try:
            self._client(peer.address).abort(request_id, timeout_s=2.0)
        except PdCommError as e:  # its lease frees the blocks anyway
            logger.info("%s: Abort of %s on %s failed: %s", self.rank_id, request_id, peer, e)

    # -- layer-wise writes (engine loop) ---------------------------------------------

    def plan_sends(
        self, handoffs: dict[str, Handoff], scheduled: list[ScheduledSequence]
    ) -> list[KVSend]:
        """This step's writes: the blocks its prompt chunks complete, for each request
        with a hand-off (every TP rank sends each layer's share of them once its K/V
        are in the cache)."""
        size = self.layout.block_size
        sends: list[KVSend] = []
        for item in scheduled:
            handoff = handoffs.get(item.seq.request_id)
            if handoff is None:
                continue
            seq = item.seq
            end = seq.num_computed_tokens + item.num_new_tokens
            # A block is written once, when whole; the prompt's last partial block with
            # the last chunk. (Rewriting a block could reorder across tcp streams.)
            end_block = -(-end // size) if end == seq.num_prompt_tokens else end // size
            first = handoff.num_sent_blocks
            if end_block > first:
                sends.append(
                    KVSend(
                        seq.request_id,
                        seq.block_ids[first:end_block],
                        handoff.dst_blocks[first:end_block],
                        handoff.target,
                    )
                )
                handoff.num_sent_blocks = end_block
        return sends

    # -- commit (worker) -------------------------------------------------------------

    def complete(self, handoff: Handoff) -> None:
        """The prompt is prefilled (``src_blocks`` and ``first_output`` set) or
        the request was aborted: wait for the writes, then Commit or Abort. On the
        engine loop, after the last step that wrote for it."""
        self.writes.flush(handoff.target)
        self.workers.submit(self._complete_job, handoff)

    def _complete_job(self, handoff: Handoff) -> None:
        try:
            error = self._settle(handoff)
        except Exception as e:
            logger.exception("hand-off of %s failed", handoff.request_id)
            error = f"internal error: {e}"
        self.calls.post(lambda: self.on_done(handoff, error))

    def _settle(self, handoff: Handoff) -> str | None:
        """None when the request is done here (committed, finished, or aborted)."""
        error = self._wait_writes(handoff)
        if handoff.aborted or handoff.finished:
            self._abort_quietly(handoff.peer, handoff.request_id)
            return None
        if error is None:
            error = self._commit(handoff)
            if error is None:
                return None
        self._abort_quietly(handoff.peer, handoff.request_id)
        handoff.reasons.append(error)
        logger.warning("%s: %s; trying another decode rank", self.rank_id, error)
        try:  # once more, elsewhere, from the parked blocks
            retry = self._reserve_somewhere(handoff.request, handoff.tried, handoff.reasons)
        except HandoffFailed as e:
            return str(e)
        retry.first_output = handoff.first_output
        try:
            self.writes.send_all(
                KVSend(retry.request_id, handoff.src_blocks, retry.dst_blocks, retry.target)
            )
            error = self._wait_writes(retry) or self._commit(retry)
        except Exception as e:  # e.g. the engine loop did not take the writes in time
            error = f"resending to {retry.peer.rank_id} failed: {e}"
        if error is not None:
            self._abort_quietly(retry.peer, retry.request_id)
            reasons = "; ".join([*handoff.reasons, error])
            return f"KV hand-off of {handoff.request_id} failed twice: {reasons}"
        handoff.peer = retry.peer
        handoff.aborted = retry.aborted
        return None

    def _wait_writes(self, handoff: Handoff) -> str | None:
        protocol = handoff.peer.protocol
        outcome = self.writes.wait(handoff.target, self.timeout_s + _REPORT_GRACE_S)
        if outcome.error is not None:
            self.events.append(["transfer_failed", protocol, 0, 0.0])
            return f"KV write to {handoff.peer.rank_id} failed: {outcome.error}"
        if outcome.num_bytes and not handoff.aborted:
            self.events.append(["transfer", protocol, outcome.num_bytes, outcome.seconds])
        return None

    def _commit(self, handoff: Handoff) -> str | None:
        request = handoff.request
        try:
            reply = self._client(handoff.peer.address).commit(
                pb.CommitRequest(
                    request_id=request.request_id,
                    transfer_id=handoff.transfer_id,
                    first_token_id=handoff.first_token,
                    num_computed_tokens=len(request.prompt_token_ids),
                    request=request,
                )
            )
        except PdCommError as e:
            return str(e)
        if reply.ok:
            return None
        if reply.aborted:
            handoff.aborted = True
            return None
        return f"decode rank {handoff.peer.rank_id} refused Commit: {reply.message}"

    def close(self) -> None:
        self.workers.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
