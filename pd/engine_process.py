"""The engine-core process of one DP rank: a ZMQ ROUTER around ``EngineCore``.

It binds the engine-worker-queue port first (so API servers can connect while
the model loads), answers HELLO with READY once the model is loaded, then
loops: take every queued message into the local scheduler, admit as many requests
as the engine can schedule, run one engine step when there is work, send each
client the outputs of its requests, and report load.
"""

from __future__ import annotations

import hmac
import logging
import multiprocessing
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import zmq

from engine.outputs import EngineCoreOutput
from pd.cpu_threads import ThreadChoice, apply_engine_threads
from pd.engine_messages import (
    AddRequest,
    EngineInfo,
    EngineStats,
    Kind,
    MalformedMessage,
    decode,
    encode,
    hello_token,
)  # fmt: skip
from scheduler.local import LocalScheduler

if TYPE_CHECKING:
    from pd.rank.settings import RankSettings

logger = logging.getLogger("pd.engine")

_IDLE_POLL_MS = 50
WORKER_DIED_EXIT_CODE = 70  # a TP worker of this engine died
GROUP_LOST_EXIT_CODE = 71  # lockstep DP: another DP rank of the MoE group is gone
_STATS_INTERVAL_S = 0.1


def run_engine_process(
    engine_kwargs: dict[str, Any],
    address: str,
    log_level: str,
    threads: ThreadChoice,
    settings: RankSettings | None = None,
    channel_key: bytes | None = None,
) -> None:
    """Entry point of the child process (spawned; everything heavy imports here, after
    ``threads`` set up OpenMP). With ``settings`` the rank joins a splitwise cluster;
    else it serves its API server through the local scheduler."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s engine %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API server decides when we stop
    logger.info("%s", apply_engine_threads(threads))
    context = zmq.Context()
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(address)
    engine = None
    try:
        from engine.config import DataParallelConfig, make_engine_config
        from engine.engine_core import EngineCore

        kwargs = dict(engine_kwargs)
        kwargs["data_parallel"] = DataParallelConfig(**kwargs.pop("data_parallel", {}))
        config = make_engine_config(**kwargs)
        if settings is None:
            engine = EngineCore(config)
            _exit_when_a_worker_dies(engine)
            logger.info("model loaded; serving on %s", address)
            loop = EngineLoop(engine, socket)
        else:
            from pd.rank.splitwise_loop import SplitwiseLoop
            from pd.rank.transfer_setup import KVPool

            # Every TP rank places its pool with its own copy of this allocator.
            engine = EngineCore(config, allocate_kv=KVPool(settings.role, settings.protocols))
            _exit_when_a_worker_dies(engine)
            logger.info("model loaded; %s rank %s", settings.role, settings.rank_id)
            loop = SplitwiseLoop(engine, socket, settings)
        loop.channel_key = channel_key
        _run_in_group(loop, engine)
    finally:
        if engine is not None:
            engine.close()  # TP workers and the transfer engines
        socket.close()
        context.term()


def _parent_pid() -> int:
    """The pid of the process that started this one. NOTE: not os.getppid() when the loop
    starts: after loading the model, by when an API server killed meanwhile has made us
    init's child, and that pid would never change."""
    parent = multiprocessing.parent_process()  # None when not started by multiprocessing
    return parent.pid if parent is not None and parent.pid else os.getppid()


def _run_in_group(loop, engine) -> None:  # type: ignore[no-untyped-def]
    """Run the loop. In lockstep DP every step meets the other DP ranks in collectives,
    so a rank that dies makes this one's next collective fail (gloo notices the closed
    socket at once; NCCL within its timeout): that ends this rank too, with its own exit
    code, and its API server fails its requests naming the cause."""
    try:
        loop.run()
    except RuntimeError as error:
        if not engine.lockstep:
            raise
        logger.error("a DP rank of this MoE group is gone; stopping: %s", error)
        engine.close()
        os._exit(GROUP_LOST_EXIT_CODE)


def _exit_when_a_worker_dies(engine) -> None:  # type: ignore[no-untyped-def]
    """A dead TP worker ends this process at once (the executor has logged which rank
    and why): the API server then fails every request of this engine with an error,
    where waiting for the next step could leave a collective blocked."""
    if hasattr(engine.executor, "on_worker_death"):
        engine.executor.on_worker_death = lambda reason: os._exit(WORKER_DIED_EXIT_CODE)


class EngineLoop:
    def __init__(self, engine, socket: zmq.Socket):
        self.engine = engine
        self.socket = socket
        self.owner: dict[str, bytes] = {}  # request id -> client identity, once admitted
        self.clients: set[bytes] = set()
        self.scheduler: LocalScheduler[AddRequest, Any] = LocalScheduler(self._send_outputs)
        self.running = True
        self.num_malformed = 0
        # The channel key (pd/cluster_secret.py); None: any HELLO is accepted (tests).
        self.channel_key: bytes | None = None
        self.num_unauthenticated = 0
        self._parent_pid = _parent_pid()
        self._last_stats = 0.0
        config = engine.config
        self.info = EngineInfo(
            max_model_len=config.scheduler.max_model_len,
            num_blocks=engine.block_manager.num_blocks,
            block_size=config.cache.block_size,
            vocab_size=config.model.vocab_size,
        )

    def run(self) -> None:
        while self.running:
            busy = self.engine.has_unfinished() or self.scheduler.num_queued
            if self.socket.poll(0 if busy else _IDLE_POLL_MS):
                self._drain_messages()
            self._admit()
            outputs = self.engine.abort_requests(self.scheduler.take_aborts())
            if self.engine.should_step():  # in lockstep DP: when any DP rank has work
                outputs += self.engine.step()
            for output in outputs:
                self.scheduler.add_result(self.owner[output.request_id], output)
            finished = [o.request_id for o in outputs if o.finished]
            self.scheduler.end_step(finished)
            for request_id in finished:
                del self.owner[request_id]
            self._maybe_send_stats()

    def _admit(self) -> None:
        """Move requests from the local scheduler into the engine, only as many as it
        could run at once: the rest wait in arrival order where aborts cost nothing."""
        scheduler = self.engine.scheduler
        max_num_seqs = self.engine.config.scheduler.max_num_seqs
        capacity = max_num_seqs - len(scheduler.running) - len(scheduler.waiting)
        for identity, request_id, request in self.scheduler.take(capacity):
            try:
                self.engine.add_request(request_id, request.prompt_token_ids, request.params)
            except ValueError as error:
                self.scheduler.end_step([request_id])
                self._send_rejected(identity, request_id, str(error))
                continue
            self.owner[request_id] = identity

    def _drain_messages(self) -> None:
        while self.running:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(frames) != 2:
                    raise MalformedMessage(f"{len(frames)} frames, not [identity, message]")
                identity, frame = frames
                kind, payload = decode(frame)
            except MalformedMessage as error:
                self._drop(error)
                continue
            self._handle(identity, kind, payload)

    def _proves_key(self, identity: bytes, token: Any) -> bool:
        if self.channel_key is None:
            return True
        expected = hello_token(self.channel_key, identity)
        return isinstance(token, str) and hmac.compare_digest(token, expected)

    def _drop(self, error: MalformedMessage) -> None:
        """A garbage frame costs its sender nothing but a log line (rate-limited)."""
        self.num_malformed += 1
        if self.num_malformed <= 10 or self.num_malformed % 1000 == 0:
            logger.warning("dropped a malformed engine message (%d so far): %s",
                           self.num_malformed, error)  # fmt: skip

    def _handle(self, identity: bytes, kind: Kind, payload: Any) -> None:
        if kind is Kind.HELLO and not self._proves_key(identity, payload):
            self._drop(MalformedMessage("a HELLO without the channel key"))
            return
        if kind is not Kind.HELLO and self.channel_key is not None and identity not in self.clients:
            self.num_unauthenticated += 1
            self._drop(MalformedMessage(f"a {kind.name} before an accepted HELLO"))
            return
        if kind is Kind.HELLO:
            self.clients.add(identity)
            self._send(identity, Kind.READY, self.info)
        elif kind is Kind.ADD:
            self._add_from_api(identity, payload)
        elif kind is Kind.ABORT:
            self._abort_from_api(payload)
        elif kind is Kind.SHUTDOWN:
            self._on_shutdown()

    def _on_shutdown(self) -> None:
        logger.info("shutdown requested")
        self.running = False

    def _add_from_api(self, identity: bytes, request: AddRequest) -> None:
        """Reject what can never run at once; queue the rest in the local scheduler."""
        try:
            self.engine.validate_prompt(request.prompt_token_ids)
            if request.request_id in self.owner:
                raise ValueError(f"request id {request.request_id!r} is already in use")
            num_tokens = len(request.prompt_token_ids)
            self.scheduler.put(request.request_id, identity, request, num_tokens)
        except ValueError as error:
            self._send_rejected(identity, request.request_id, str(error))

    def _abort_from_api(self, request_ids: list[str]) -> None:
        for identity, request_id in self.scheduler.abort(request_ids):  # never admitted
            aborted = EngineCoreOutput(request_id, [], finish_reason="abort")
            self._send(identity, Kind.OUTPUTS, [aborted])

    def _send_rejected(self, identity: bytes, request_id: str, message: str) -> None:
        self._send(identity, Kind.REJECTED, [request_id, message])

    def _send_outputs(self, identity: bytes, outputs: list) -> None:
        self._send(identity, Kind.OUTPUTS, outputs)

    def _maybe_send_stats(self) -> bool:
        """Send stats when the interval has passed; True when it did."""
        now = time.monotonic()
        if now - self._last_stats < _STATS_INTERVAL_S:
            return False
        self._last_stats = now
        if os.getppid() != self._parent_pid:  # the API server died (e.g. SIGKILL)
            logger.error("the API server process is gone; stopping")
            self.running = False
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        stats = EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting) + self.scheduler.num_queued,
            num_free_blocks=blocks.num_free_blocks,
            num_blocks=blocks.num_blocks,
            kv_events=self._kv_events(),
            tp_workers_alive=self.engine.executor.workers_alive(),
            num_requests_taken=self.engine.num_requests_taken,
            num_dummy_steps=self.engine.num_dummy_steps,
            expert_tokens=self._expert_tokens(),
        )
        for identity in self.clients:
            self._send(identity, Kind.STATS, stats)
        return True

    def _expert_tokens(self) -> list[int]:
        """MoE routing counts, read between steps (a sync with the device every stats
        interval, only for MoE models)."""
        if self.engine.config.model.moe is None:
            return []
        return self.engine.expert_token_counts()

    def _kv_events(self) -> list:
        return []  # a local instance moves no KV

    def _send(self, identity: bytes, kind: Kind, payload: Any) -> None:
        self.socket.send_multipart([identity, encode(kind, payload)])
