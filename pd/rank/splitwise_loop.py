"""The engine loop of a rank in a splitwise cluster, over Redis or paired by pd-router.

Requests arrive from Redis (the queue of a prefill or mixed rank) or from a prefill
rank's Commit (a decode rank); results go to each request's API server over Redis, one
batch per step, indexed so that the first token (prefill's) and the rest (decode's)
arrive in order. The instance's own API server still says HELLO/SHUTDOWN and reads
stats over ZMQ, but submits through Redis like any other.

Paired by ``pd-router --splitwise`` (``settings.paired_by_router``), the same loop runs
without Redis: a prefill rank's requests come from its own API server over ZMQ with the
decode rank the router chose, and results go straight to their owner
(``scheduler/direct_rank.py``); the rest is unchanged.

    prefill: take -> Reserve (worker) -> prefill, writing each layer's blocks ->
             parked -> writes done + Commit (worker) -> first token out, blocks freed
    decode:  Reserve / Commit on the loop (pd-comm) -> adopted into the running batch
    mixed:   take -> the whole request here

One iteration: ZMQ messages, work posted by other threads, take + aborts (Redis), one
engine step, results + releases (one Redis round trip), load. A Redis outage pauses
the Redis parts only; the engine keeps stepping what it holds.
"""

from __future__ import annotations

import logging
import secrets
import time

import zmq

from cache_transfer.auth import SESSION_BYTES
from cache_transfer.pd_comm import CommitRefused
from engine.engine_core import EngineCore
from engine.outputs import EngineCoreOutput
from engine.scheduler import ScheduledSequence
from engine.sequence import SequenceStatus
from engine.step_plan import KVSend
from pd.cluster_secret import results_key
from pd.cluster_wire import (
    check_dispatched,
    kv_fingerprint,
    layout_to_proto,
    output_to_entry,
    params_to_proto,
)
from pd.engine_messages import AddRequest
from pd.engine_process import EngineLoop
from pd.rank.decode_intake import DecodeIntake
from pd.rank.kv_group import PrefillWrites, ShardedReceiver, WriteReports
from pd.rank.loop_calls import LoopCalls
from pd.rank.paired_decodes import PairedDecodes
from pd.rank.prefill_handoff import Handoff, PrefillHandoff
from pd.rank.settings import RankSettings
from proto import cluster_pb2 as pb
from proto import pd_comm_pb2 as comm_pb
from scheduler.config import ID_PATTERN
from scheduler.direct_rank import DirectRank
from scheduler.direct_results import OWNER_ADDRESS
from scheduler.records import MalformedRecord, encode
from scheduler.redis_link import SchedulerUnavailable
from scheduler.registry import RegistryReader, parse_record
from scheduler.splitwise import SplitwiseRank

logger = logging.getLogger("pd.engine")

_IDLE_S = 0.05
# A stopping rank finishes what it holds for at most this long (pd-serve gives its engine
# 10 s after SHUTDOWN); what is left then fails with an explained error.
_DRAIN_S = 8.0
_PENDING_POLL_MS = 5  # while hand-offs are in flight: their outcomes also wake us


class SplitwiseLoop(EngineLoop):
    def __init__(
        self,
        engine: EngineCore,
        socket: zmq.Socket,
        settings: RankSettings,
    ):
        super().__init__(engine, socket)
        self.settings = settings
        self.role = settings.role
        self.rank_id = settings.rank_id
        self.calls = LoopCalls()
        self.poller = zmq.Poller()
        self.poller.register(socket, zmq.POLLIN)
        self.poller.register(self.calls.fileno(), zmq.POLLIN)
        self.owners: dict[str, str] = {}  # request id -> API server id
        self.emitted: dict[str, int] = {}  # request id -> index of its next token
        self.finished: list[str] = []  # done here; released with the next results
        self.reserving: dict[str, pb.DispatchedRequest] = {}
        self.aborted_reserving: set[str] = set()
        self.handoffs: dict[str, Handoff] = {}
        self.redis_down = False
        self.drain_deadline: float | None = None  # set by SHUTDOWN: finish, take nothing new
        self.paired = settings.paired_by_router  # no Redis: pd-router paired the requests
        self.owner_pattern = OWNER_ADDRESS if self.paired else ID_PATTERN
        executor = engine.executor
        layout, tp_size = executor.kv_layout, executor.tp_size
        self.fingerprint = kv_fingerprint(
            settings.model, layout, tp_size, engine.config.model.num_key_value_heads
        )
        if self.role != "mixed":  # each TP rank moves its own KV shard
            executor.load_extension(
                "pd.rank.rank_transfer:RankTransfer", self.role, settings.protocols,
                settings.host, settings.rdma_comm_ports, settings.handoff_timeout_s,
                settings.secret, secrets.token_bytes(SESSION_BYTES),
            )  # fmt: skip
        self.intake: DecodeIntake | None = None
        pd_comm_port = 0
        if self.role == "decode":
            per_rank = executor.call_extension("endpoints")
            receivers = {
                protocol: ShardedReceiver(
                    protocol, layout, [endpoints[protocol] for endpoints in per_rank], executor
                )
                for protocol in per_rank[0]
            }
            self.intake = DecodeIntake(
                self.rank_id, self.fingerprint, engine.block_manager, receivers,
                self.calls, self._adopt, settings.host, settings.pd_comm_port, settings.lease_s,
                settings.secret, engine.config.scheduler.max_model_len,
                on_abort=self._abort_from_owner if self.paired else None,
            )  # fmt: skip
            pd_comm_port = self.intake.port
        data_parallel = engine.config.data_parallel
        record = pb.InstanceRecord(
            rank_id=self.rank_id, role=self.role, host=settings.host, model=settings.model,
            dp_rank=data_parallel.rank, dp_size=data_parallel.size, tp_size=tp_size,
            api_port=settings.api_port, pd_comm_port=pd_comm_port, protocols=settings.protocols,
            rdma_comm_ports=settings.rdma_comm_ports, kv_layout=layout_to_proto(layout),
        )  # fmt: skip
        self.decodes: RegistryReader | PairedDecodes | None = None  # where prefill finds them
        self.handoff: PrefillHandoff | None = None
        if self.role == "prefill":
            self.decodes = PairedDecodes() if self.paired else RegistryReader(
                settings.scheduler, name=f"registry[{self.rank_id}]"
            )  # fmt: skip
            reports = WriteReports(tp_size)
            executor.on_notify = reports.add  # each TP rank's word on its writes
            self.handoff = PrefillHandoff(
                record, PrefillWrites(executor, self.calls, reports), layout, self.fingerprint,
                self.decodes, self.calls, self._on_reserved, self._on_reserve_failed,
                self._on_handoff_done, settings.handoff_timeout_s, settings.secret,
            )  # fmt: skip
        self.info.rank_record = encode(record)  # for the router's pairings
        self.rank: SplitwiseRank | DirectRank
        self.direct: DirectRank | None = None  # paired: what only a direct rank does
        if self.paired:
            # Beats three times a period; three silent periods end a request either way.
            period_s = settings.scheduler.expire_period_s
            key = results_key(settings.secret)
            self.rank = self.direct = DirectRank(self.rank_id, key, period_s / 3, 3 * period_s)
            logger.info("rank %s (%s) is paired by pd-router", self.rank_id, self.role)
        else:
            self.rank = SplitwiseRank(settings.scheduler, record).start()
            logger.info("rank %s (%s) registered in topic %r", self.rank_id, self.role,
                        settings.scheduler.topic)  # fmt: skip

    # -- the loop --------------------------------------------------------------------

    def run(self) -> None:
        try:
            while self.running:
                self._drain_messages()
                self.calls.run_pending()
                self._sync_with_scheduler()
                stepping = self.engine.should_step()  # in lockstep DP: any DP rank busy
                if stepping:
                    planner = self._plan_kv_sends if self.handoff is not None else None
                    for output in self.engine.step(planner):
                        self._on_output(output)
                self._end_step()
                self._maybe_send_stats()
                if self.drain_deadline is not None:
                    self._check_drained()
                if self._may_idle(stepping):
                    self._idle()
        finally:
            self.close()

    def _may_idle(self, stepping: bool) -> bool:
        """Wait for work unless there is some to run: a lockstep rank whose DP group is
        busy steps again at once (the others wait for it), else a rank idles when it
        has nothing to run or nothing it can schedule now."""
        if self.engine.lockstep:
            return not stepping
        return not (self.engine.has_unfinished() and not self.engine.stalled)

    def _sync_with_scheduler(self) -> None:
        try:
            if self.role != "decode":
                self._take(self.rank.take(self._capacity()))
            for request_id in self.rank.take_aborts():
                self._abort(request_id)
            self.redis_down = False
        except SchedulerUnavailable:
            self.redis_down = True

    def _idle(self) -> None:
        """Wait for work: a prefill or mixed rank with nothing in flight blocks on its
        Redis queue; otherwise ZMQ messages and posted work wake us."""
        pending = bool(self.reserving or self.handoffs)
        capacity = self._capacity()
        from_redis = self.role != "decode" and not self.paired
        if from_redis and not pending and capacity > 0 and not self.redis_down:
            try:
                self._take(self.rank.take(capacity, block_s=_IDLE_S))
                return
            except SchedulerUnavailable:
                self.redis_down = True
        timeout_ms = _PENDING_POLL_MS if pending else int(_IDLE_S * 1000)
        self.poller.poll(timeout_ms)

    def _capacity(self) -> int:
        if self.drain_deadline is not None:
            return 0
        max_num_seqs = self.engine.config.scheduler.max_num_seqs
        return max_num_seqs - len(self.engine.sequences) - len(self.reserving)

    def _end_step(self) -> None:
        finished, self.finished = self.finished, []
        try:
            self.rank.end_step(finished)  # marks them finished first: a failure keeps them
        except SchedulerUnavailable:
            self.redis_down = True

    def _report_load(self) -> None:
        scheduler = self.engine.scheduler
        queued = sum(s.num_uncomputed_tokens for s in scheduler.waiting)
        queued += sum(len(r.prompt_token_ids) for r in self.reserving.values())
        self.rank.update_load(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting) + len(self.reserving),
            num_queued_prompt_tokens=queued,
            num_free_blocks=self.engine.block_manager.num_free_blocks,
        )

    # -- stopping --------------------------------------------------------------------

    def _on_shutdown(self) -> None:
        """Drain: take no new request (no queue takes, no new reservations), finish what
        runs and what is in flight to us, then stop; bounded by _DRAIN_S."""
        logger.info("shutdown requested: %s drains (at most %.0f s)", self.rank_id, _DRAIN_S)
        self.drain_deadline = time.monotonic() + _DRAIN_S
        if self.intake is not None:
            self.intake.service.draining = True

    def _check_drained(self) -> None:
        reservations = 0 if self.intake is None else len(self.intake.service.reservations)
        busy = self.engine.has_unfinished() or self.reserving or self.handoffs or reservations
        if not busy:
            self.running = False
            return
        if time.monotonic() < self.drain_deadline:  # type: ignore[operator]
            return
        left = [r for r in self.owners if r not in self.handoffs and r not in self.reserving]
        logger.warning("%s: drain bound reached; failing %d requests", self.rank_id, len(left))
        for request_id in left:
            self.engine.abort_requests([request_id])
            self._fail(request_id, f"{self.rank_id} stopped before the request finished")
        self._end_step()
        self.running = False

    # -- requests in -----------------------------------------------------------------

    def _take(self, requests: list[pb.DispatchedRequest]) -> None:
        for request in requests:
            request_id = request.request_id
            self.owners[request_id] = request.owner
            disaggregated = request.decode_rank_id not in ("", self.rank_id)
            if self.role == "prefill" and disaggregated:
                self.reserving[request_id] = request
                self.handoff.reserve(request)  # type: ignore[union-attr]
            else:
                self._add_to_engine(request)

    def _add_to_engine(self, request: pb.DispatchedRequest, prefill_only: bool = False) -> bool:
        try:
            params = check_dispatched(request, self.engine, self.owner_pattern)
            self.engine.add_request(
                request.request_id, list(request.prompt_token_ids), params, prefill_only
            )
        except ValueError as e:
            self._fail(request.request_id, f"request refused by {self.rank_id}: {e}")
            return False
        self.emitted[request.request_id] = 0
        return True

    def _on_reserved(self, handoff: Handoff) -> None:
        request_id = handoff.request_id
        self.reserving.pop(request_id, None)
        if request_id in self.aborted_reserving:
            self.aborted_reserving.discard(request_id)
            handoff.aborted = True
        elif self._add_to_engine(handoff.request, prefill_only=True):
            self.handoffs[request_id] = handoff
            return
        else:
            handoff.aborted = True  # refused by the engine: give the blocks back
        self.handoff.complete(handoff)  # type: ignore[union-attr]

    def _on_reserve_failed(self, request: pb.DispatchedRequest, message: str) -> None:
        request_id = request.request_id
        self.reserving.pop(request_id, None)
        if request_id in self.aborted_reserving:
            self.aborted_reserving.discard(request_id)
            self._finish(request_id)
        else:
            self._fail(request_id, message)

    def _adopt(self, commit: comm_pb.CommitRequest, block_ids: list[int]) -> None:
        """A decode rank takes over a prefilled request (on the loop, from pd-comm).
        Every field is checked before anything is written; a failure after the rank
        holds it (over Redis: its T:proc entry) lets it go, so nothing outlives a refusal."""
        request = commit.request
        request_id = request.request_id
        if self.rank.was_aborted(request_id):
            raise CommitRefused(f"request {request_id} was aborted", aborted=True)
        try:
            params = check_dispatched(request, self.engine, self.owner_pattern)
            vocab_size = self.engine.config.model.vocab_size
            if commit.first_token_id >= vocab_size:
                raise ValueError(f"first_token_id must be below the vocabulary size {vocab_size}")
        except ValueError as e:
            raise CommitRefused(f"{self.rank_id} cannot run {request_id}: {e}") from None
        try:
            self.rank.adopt(request)  # from here the reaper (or the owner) notices if we die
        except SchedulerUnavailable as e:
            raise CommitRefused(f"{self.rank_id} cannot reach the scheduler: {e}") from None
        try:
            self.engine.adopt_request(
                request_id, list(request.prompt_token_ids), [commit.first_token_id], params,
                block_ids,
            )  # fmt: skip
        except Exception as e:
            self.rank.unadopt(request_id)
            raise CommitRefused(f"{self.rank_id} cannot run {request_id}: {e}") from None
        self.owners[request_id] = request.owner
        self.emitted[request_id] = 1

    def _abort(self, request_id: str) -> None:
        """An abort (over Redis, or from a paired request's owner): the request's stream
        ends with an error event, whoever sent it (an owner that aborted its own request
        has stopped reading already)."""
        owner = self.owners.get(request_id)
        if owner is not None:
            self.rank.add_result(owner, pb.ResultEntry(
                request_id=request_id, finish_reason="error", rank_id=self.rank_id,
                error=f"request {request_id} was aborted on {self.rank_id}",
            ))  # fmt: skip
        if request_id in self.reserving:
            self.aborted_reserving.add(request_id)  # settled when the Reserve returns
            return
        handoff = self.handoffs.get(request_id)
        if handoff is not None:
            handoff.aborted = True
            seq = self.engine.sequences.get(request_id)
            if seq is not None and seq.status is not SequenceStatus.PARKED:
                self.engine.abort_requests([request_id])  # stop prefilling; writes settle
                self.handoff.complete(handoff)  # type: ignore[union-attr]
            return  # a parked one: its hand-off sees the flag and Aborts
        self.engine.abort_requests([request_id])
        self._finish(request_id)

    # -- prefill's writes ------------------------------------------------------------

    def _plan_kv_sends(self, scheduled: list[ScheduledSequence]) -> list[KVSend]:
        return self.handoff.plan_sends(self.handoffs, scheduled)  # type: ignore[union-attr]

    def _on_handoff_done(self, handoff: Handoff, error: str | None) -> None:
        request_id = handoff.request_id
        self.handoffs.pop(request_id, None)
        seq = self.engine.sequences.get(request_id)
        if seq is not None and seq.status is SequenceStatus.PARKED:
            self.engine.release_parked(request_id)
        if error is not None and not handoff.aborted:
            self._fail(request_id, error)
            return
        if not handoff.aborted:
            first = handoff.first_output
            self.rank.add_result(self.owners[request_id], output_to_entry(first, 0, self.rank_id))
        self._finish(request_id)

    # -- results out -----------------------------------------------------------------

    def _on_output(self, output: EngineCoreOutput) -> None:
        request_id = output.request_id
        handoff = self.handoffs.get(request_id)
        if handoff is not None:  # prefilled: hand it over before saying anything
            handoff.src_blocks = list(self.engine.sequences[request_id].block_ids)
            handoff.first_output = output
            self.handoff.complete(handoff)  # type: ignore[union-attr]
            return
        index = self.emitted[request_id]
        self.emitted[request_id] = index + len(output.new_token_ids)
        self.rank.add_result(self.owners[request_id], output_to_entry(output, index, self.rank_id))
        if output.finished:
            self._finish(request_id)

    def _fail(self, request_id: str, message: str) -> None:
        logger.warning("%s: request %s failed: %s", self.rank_id, request_id, message)
        entry = pb.ResultEntry(
            request_id=request_id, finish_reason="error", error=message, rank_id=self.rank_id
        )
        self.rank.add_result(self.owners[request_id], entry)
        self._finish(request_id)

    def _finish(self, request_id: str) -> None:
        self.finished.append(request_id)
        self.owners.pop(request_id, None)
        self.emitted.pop(request_id, None)

    def _maybe_send_stats(self) -> bool:
        sent = super()._maybe_send_stats()
        if sent:  # the registry sees load at the same 100 ms beat
            self._report_load()
        return sent

    def _kv_events(self) -> list:
        events = []
        while self.handoff is not None and self.handoff.events:
            events.append(self.handoff.events.popleft())
        return events

    # -- the local API server --------------------------------------------------------

    def _add_from_api(self, identity: bytes, request: AddRequest) -> None:
        """Paired by the router: a prefill rank queues the request for its decode rank.
        Anything else is refused: requests come through Redis or from a prefill rank."""
        pairing = request.pairing
        decodes = self.decodes
        paired_prefill = self.direct is not None and isinstance(decodes, PairedDecodes)
        if not (paired_prefill and pairing is not None):
            how = ("from prefill ranks that pd-router --splitwise pairs it with" if self.paired
                   else "through the splitwise scheduler")  # fmt: skip
            message = f"a {self.role} rank takes requests {how}, not directly"
            self._send_rejected(identity, request.request_id, message)
            return
        try:
            decode = parse_record(pairing.decode_record)
            if not ID_PATTERN.fullmatch(decode.rank_id):
                raise ValueError("the paired rank's id is not a plain id")
            if decode.role != "decode":
                raise ValueError(f"the paired rank {decode.rank_id!r} is a {decode.role} rank")
            dispatched = pb.DispatchedRequest(
                request_id=request.request_id, owner=pairing.owner,
                prompt_token_ids=request.prompt_token_ids,
                sampling=params_to_proto(request.params), prefill_rank_id=self.rank_id,
                decode_rank_id=decode.rank_id,
            )  # fmt: skip
            self.direct.submit(dispatched)
        except (ValueError, MalformedRecord) as e:
            self._send_rejected(identity, request.request_id, str(e))
            return
        decodes.learn(decode)

    def _abort_from_api(self, request_ids: list[str]) -> None:
        """The API server's aborts reach a paired rank over ZMQ (over Redis they come
        from the control list)."""
        for request_id in request_ids:
            self._abort_from_owner(request_id)

    def _abort_from_owner(self, request_id: str) -> None:
        if self.direct is not None:
            self.direct.abort(request_id)

    def close(self) -> None:
        self.rank.close(deregister=True)
        if self.intake is not None:
            self.intake.close()
        if self.handoff is not None:
            self.handoff.close()
        if self.decodes is not None:
            self.decodes.close()
        self.calls.close()
