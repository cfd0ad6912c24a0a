"""A TP worker process (ranks 1..N-1 of a DP rank's tensor-parallel group).

It joins the group, builds its ``Worker`` (its shard of the weights and of the KV
heads), says READY to the executor, then runs every plan it receives. It runs each
step to its end before taking the next plan: its rows then hold the sampled tokens
on the host, which gives the same inputs as rank 0's pending tokens, so one rank may
schedule asynchronously while the others do not.

Frames from the executor: ``[STEP, plan bytes]``, ``[LOAD, msgpack [name, args]]``
(build a worker extension, see ``engine.executor``), ``[CALL, msgpack [method, args]]``
or ``[QUIT]``; to it: ``[READY]``, ``[ERROR, text]`` when start-up fails, and
``[REPLY, msgpack [ok, answer or error text]]`` for each LOAD and CALL. A control
thread takes CALLs that must not wait for a step on a second channel (one at a time,
same frames). Extensions' notifications go to the executor's PULL socket.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from typing import Any

import msgpack
import torch
import zmq

from engine.config import EngineConfig, rank_device
from engine.distributed import GroupAddress, join_group
from engine.model_runner import KVAllocator
from engine.plan_codec import decode_plan

logger = logging.getLogger("engine.tp_worker")

STEP, LOAD, CALL, QUIT = b"S", b"L", b"C", b"Q"
READY, ERROR, REPLY = b"R", b"E", b"A"
_PARENT_POLL_S = 0.5


def run_tp_worker(
    config: EngineConfig,
    rank: int,
    address: GroupAddress,
    sockets: tuple[str, str, str],
    allocate_kv: KVAllocator,
    num_threads: int,
) -> None:
    """``sockets``: the executor's plan channel, control channel and notification sink."""
    logging.basicConfig(
        level=logging.getLogger().getEffectiveLevel(),
        format=f"%(asctime)s tp-worker-{rank} %(message)s",
    )
    torch.set_num_threads(num_threads)
    # NOTE: the engine's pid as spawn recorded it: os.getppid() here, after the imports,
    # is init's when the engine died meanwhile, and the watch would never end.
    parent = multiprocessing.parent_process()
    _exit_with_parent(parent.pid if parent is not None and parent.pid else os.getppid())
    channel, control, notices = sockets
    context = zmq.Context()
    socket = _dealer(context, channel, rank)
    notify = _Notifier(context, notices)
    try:
        from engine.worker import Worker  # after the threads are set

        group = join_group(address, rank, rank_device(config.device, rank))
        worker = Worker(config, group, allocate_kv)
    except Exception as error:
        logger.exception("TP worker %d failed to start", rank)
        socket.send_multipart([ERROR, f"rank {rank}: {error}".encode()])
        socket.close()
        raise SystemExit(1) from error
    holder = _ExtensionHolder()
    threading.Thread(
        target=_serve_control, args=(context, control, rank, holder), name="tp-control",
        daemon=True,
    ).start()  # fmt: skip
    socket.send_multipart([READY])
    while True:
        kind, *payload = socket.recv_multipart()
        if kind == STEP:
            worker.result(worker.submit(decode_plan(payload[0])))
        elif kind in (LOAD, CALL):
            name, args = msgpack.unpackb(payload[0], raw=False)
            if kind == LOAD:
                reply = _answer(rank, name, holder.load, name, worker, notify, args)
            else:
                reply = _answer(rank, name, holder.call, name, args)
            socket.send_multipart([REPLY, reply])
        elif kind == QUIT:
            break
        else:
            raise SystemExit(f"TP worker {rank}: unknown frame {kind!r} from the executor")
    holder.close()
    socket.close()
    notify.close()
    context.term()


class _ExtensionHolder:
    """The worker's extension, shared by the main loop (ordered calls) and the control
    thread (calls that run at once, on methods that are thread-safe)."""

    def __init__(self) -> None:
        self.extension: Any = None

    def load(self, name: str, worker: Any, notify: Any, args: list) -> None:
        from engine.executor import build_extension

        self.extension = build_extension(name, worker, notify, args)

    def call(self, method: str, args: list) -> Any:
        if self.extension is None:
            raise RuntimeError("no extension is loaded")
        return getattr(self.extension, method)(*args)

    def close(self) -> None:
        if self.extension is not None:
            self.extension.close()


def _answer(rank: int, name: str, run: Any, *args: Any) -> bytes:
    """A REPLY payload: [True, what ``run(*args)`` returned] or [False, why it raised]."""
    try:
        reply = [True, run(*args)]
    except Exception as error:  # the executor raises it on rank 0
        logger.exception("TP worker %d: %s failed", rank, name)
        reply = [False, f"rank {rank}: {name}: {error}"]
    return msgpack.packb(reply, use_bin_type=True)


def _serve_control(context: zmq.Context, address: str, rank: int, holder: _ExtensionHolder) -> None:
    socket = _dealer(context, address, rank)
    socket.send_multipart([READY])
    while True:
        try:
            _, payload = socket.recv_multipart()  # always a CALL
        except zmq.ZMQError:
            return  # the context is ending
        name, args = msgpack.unpackb(payload, raw=False)
        socket.send_multipart([REPLY, _answer(rank, name, holder.call, name, args)])


def _dealer(context: zmq.Context, address: str, rank: int) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.IDENTITY, f"rank-{rank}".encode())
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(address)
    return socket


class _Notifier:
    """An extension's ``notify``: msgpack payloads pushed to rank 0, from any thread."""

    def __init__(self, context: zmq.Context, address: str):
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 1000)
        self._socket.connect(address)
        self._lock = threading.Lock()

    def __call__(self, payload: Any) -> None:
        data = msgpack.packb(payload, use_bin_type=True)
        with self._lock:
            self._socket.send(data)

    def close(self) -> None:
        self._socket.close()


def _exit_with_parent(parent_pid: int) -> None:
    """Leave no orphan: when the engine process is gone (even killed), so is this one."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
