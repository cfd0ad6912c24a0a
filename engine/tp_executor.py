"""Tensor parallelism: rank 0's worker in this process, ranks 1..N-1 in processes of
their own, every rank running the same step plans.

    engine core --plan bytes (ZMQ ROUTER, one send per worker)--> TP worker 1..N-1
         |                                                            |
         +-- rank 0 Worker <====== collectives (gloo / NCCL) ======> Worker

Each step the plan is encoded once (``engine.plan_codec``) and sent to every worker
before rank 0 runs it; the forward's collectives keep the ranks in step and the
driver's token broadcast gives every rank the sampled ids. Only rank 0 returns
results. Extension loads and calls travel on the same channel, so they run between
the same steps on every rank; extensions' notifications come back on a PULL socket
that a thread here drains into ``on_notify``.

A worker that dies is noticed by a watcher thread (its process sentinel): it logs
which rank died and how, stops the other workers, aborts the group so that a
collective waiting on the dead rank fails, and calls ``on_worker_death``. Every
later call raises ``WorkerDiedError``. Workers exit when this process does, even
when it is killed (each watches its parent).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import torch
import zmq

from engine.config import EngineConfig, rank_device
from engine.distributed import host_group_store, join_group
from engine.executor import Notify, build_extension
from engine.kv_cache import KVCacheLayout
from engine.model_runner import KVAllocator
from engine.plan_codec import encode_plan
from engine.step_plan import StepPlan, StepResult
from engine.tp_worker import CALL, ERROR, LOAD, QUIT, READY, REPLY, STEP, run_tp_worker
from engine.worker import PendingStep, Worker

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 5.0
_NOTICE_TIMEOUT_S = 2.0  # how long a failed collective waits for the watcher's verdict


class WorkerDiedError(RuntimeError):
    """A TP worker of this engine is gone; the engine cannot step any more."""


class TPExecutor:
    def __init__(self, config: EngineConfig, allocate_kv: KVAllocator):
        size = config.tensor_parallel_size
        self.tp_size = size
        self.failure: str | None = None
        self.on_worker_death: Callable[[str], None] | None = None
        self.on_notify: Notify = lambda payload: None
        self.extension: Any = None
        self._closing = False
        store, address = host_group_store("127.0.0.1", size)
        self._store = store  # rank 0 hosts the group's rendezvous while it lives
        self._context = zmq.Context()
        self._channel = self._context.socket(zmq.ROUTER)
        self._channel.setsockopt(zmq.LINGER, 0)
        self._channel.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone worker raises, not drops
        self._channel.bind("tcp://127.0.0.1:*")
        channel = self._channel.getsockopt_string(zmq.LAST_ENDPOINT)
        self._control = self._context.socket(zmq.ROUTER)
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._control.bind("tcp://127.0.0.1:*")
        self._control_lock = threading.Lock()  # one control call at a time, any thread
        control = self._control.getsockopt_string(zmq.LAST_ENDPOINT)
        self._notices = self._context.socket(zmq.PULL)
        self._notices.setsockopt(zmq.LINGER, 0)
        self._notices.bind("tcp://127.0.0.1:*")
        notices = self._notices.getsockopt_string(zmq.LAST_ENDPOINT)
        spawn = multiprocessing.get_context("spawn")
        num_threads = torch.get_num_threads()
        sockets = (channel, control, notices)
        self.processes = [
            spawn.Process(
                target=run_tp_worker,
                args=(config, rank, address, sockets, allocate_kv, num_threads),
                name=f"pd-tp-worker-{rank}",
                daemon=True,
            )
            for rank in range(1, size)
        ]
        for process in self.processes:
            process.start()
        logger.info(
            "tensor parallel %d: workers %s",
            size, ", ".join(f"rank {r + 1} pid {p.pid}" for r, p in enumerate(self.processes)),
        )  # fmt: skip
        self.group = None
        self._watcher = threading.Thread(target=self._watch, name="tp-watch", daemon=True)
        self._watcher.start()
        self._receiver = threading.Thread(target=self._receive, name="tp-notices", daemon=True)
        self._receiver.start()
        try:
            self.group = join_group(address, 0, rank_device(config.device, 0), store)
            self.worker = Worker(config, self.group, allocate_kv)
            self._workers = self._wait_ready(size - 1)
        except Exception as error:
            self.close()
            if self.failure is not None:
                raise WorkerDiedError(f"{self.failure} while starting") from error
            raise

    # -- steps -------------------------------------------------------------------------

    def submit(self, plan: StepPlan) -> PendingStep:
        self._check_alive()
        payload = encode_plan(plan)
        try:
            for identity in self._workers:
                self._channel.send_multipart([identity, STEP, payload], copy=False)
            return self.worker.submit(plan)
        except Exception as error:
            self._step_failed(error)
            raise

    def result(self, step: PendingStep) -> StepResult:
        self._check_alive()
        try:
            return self.worker.result(step)
        except Exception as error:
            self._step_failed(error)
            raise

    # -- extensions --------------------------------------------------------------------

    def load_extension(self, name: str, *args: Any) -> None:
        self._check_alive()
        self._broadcast(self._channel, LOAD, [name, list(args)])
        try:
            self.extension = build_extension(name, self.worker, self._notify, list(args))
        finally:  # every worker's answer is read, whatever happened here
            self._replies(self._channel)

    def call_extension(self, method: str, *args: Any, ordered: bool = True) -> list:
        """Every rank's answer, rank 0 first (raises if a rank's call raised).

        ``ordered``: between the same steps on every rank, from the engine loop only.
        Otherwise at once, from any thread, on the workers' control threads: for
        thread-safe methods that must not wait for a step (a decode rank's allow and
        revoke, called by pd-comm's handlers)."""
        self._check_alive()
        if ordered:
            return self._call_everywhere(self._channel, method, args)
        with self._control_lock:
            return self._call_everywhere(self._control, method, args)

    def _call_everywhere(self, socket: zmq.Socket, method: str, args: tuple) -> list:
        self._broadcast(socket, CALL, [method, list(args)])
        try:
            local = getattr(self.extension, method)(*args)
        finally:  # every worker's answer is read, whatever happened here
            remote = self._replies(socket)
        return [local, *remote]

    def _notify(self, payload: Any) -> None:
        self.on_notify(payload)

    def _broadcast(self, socket: zmq.Socket, kind: bytes, message: list) -> None:
        payload = msgpack.packb(message, use_bin_type=True)
        for identity in self._workers:
            socket.send_multipart([identity, kind, payload])

    def _replies(self, socket: zmq.Socket) -> list:
        """Each worker's answer to the last LOAD or CALL on ``socket``, in rank order."""
        answers: dict[bytes, Any] = {}
        errors = []
        while len(answers) < len(self._workers):
            self._check_alive()
            if not socket.poll(100):
                continue
            identity, kind, payload = socket.recv_multipart()
            if kind != REPLY:
                raise RuntimeError(f"unexpected {kind!r} from a TP worker awaiting replies")
            ok, value = msgpack.unpackb(payload, raw=False)
            answers[identity] = value
            if not ok:
                errors.append(value)
        if errors:
            raise RuntimeError(f"a TP worker's extension call failed: {errors[0]}")
        return [answers[identity] for identity in self._workers]

    def _receive(self) -> None:
        """Extensions' notifications from the workers, handed to ``on_notify``."""
        while not self._closing:
            try:
                if not self._notices.poll(200):
                    continue
                payload = msgpack.unpackb(self._notices.recv(), raw=False)
            except zmq.ZMQError:
                return  # closed
            self.on_notify(payload)

    @property
    def kv_layout(self) -> KVCacheLayout:
        return self.worker.runner.layout

    @property
    def kv_cache(self) -> torch.Tensor:
        """Rank 0's KV pool."""
        return self.worker.runner.kv_cache

    def workers_alive(self) -> list[bool]:
        """Liveness of every TP rank, rank 0 (this process) first."""
        return [True, *(p.is_alive() for p in self.processes)]

    def close(self) -> None:
        """Stop the workers (politely, then by force) and release the channel."""
        if self._closing:
            return
        self._closing = True
        if self.extension is not None:
            self.extension.close()
        for identity in getattr(self, "_workers", []):
            with contextlib.suppress(zmq.ZMQError):  # already gone
                self._channel.send_multipart([identity, QUIT])
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        self._receiver.join(1.0)
        self._channel.close()
        self._control.close()
        self._notices.close()
        self._context.term()

    # -- start-up and failures ----------------------------------------------------------

    def _wait_ready(self, count: int) -> list[bytes]:
        """Identities of the workers, once each has loaded its shard and its control
        thread is connected."""
        ready: list[bytes] = []
        while len(ready) < count:
            self._check_alive()
            if not self._channel.poll(100):
                continue
            identity, kind, *rest = self._channel.recv_multipart()
            if kind == ERROR:
                raise RuntimeError(f"a TP worker failed to start: {rest[0].decode()}")
            if kind == READY:
                ready.append(identity)
        connected: set[bytes] = set()
        while len(connected) < count:  # each control thread says READY once
            self._check_alive()
            if self._control.poll(100):
                connected.add(self._control.recv_multipart()[0])
        return sorted(ready, key=lambda identity: int(identity.split(b"-")[1]))

    def _watch(self) -> None:
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.processes, start=1)}
        while not self._closing:
            done = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            if not done or self._closing:
                continue
            rank, process = sentinels[done[0]]
            process.join()
            self._fail(f"TP worker {rank} (pid {process.pid}) exited with code {process.exitcode}")
            return

    def _fail(self, reason: str) -> None:
        if self.failure is not None:  # the first reason stands (killing the rest ends them)
            return
        self.failure = reason
        logger.error("%s: this engine stops", reason)
        for process in self.processes:
            if process.is_alive():
                process.kill()
        if self.group is not None:
            self.group.abort()
        if self.on_worker_death is not None:
            self.on_worker_death(reason)

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise WorkerDiedError(self.failure)

    def _step_failed(self, error: Exception) -> None:
        """A step failed here: say which worker died if one did; else rank 0 alone
        failed, the ranks' collectives are out of step, and the group cannot go on."""
        self._raise_if_a_worker_died(error)
        self._fail(f"TP rank 0 failed during a step ({error}); the ranks are out of step")

    def _raise_if_a_worker_died(self, error: Exception) -> None:
        """A collective that failed because a peer died: say which worker, not gloo's
        socket error (the watcher may need a moment to see the exit)."""
        deadline = time.monotonic() + _NOTICE_TIMEOUT_S
        while self.failure is None and time.monotonic() < deadline:
            if not all(p.is_alive() for p in self.processes):
                self._watcher.join(_NOTICE_TIMEOUT_S)
                break
            time.sleep(0.05)
        if self.failure is not None:
            raise WorkerDiedError(self.failure) from error
