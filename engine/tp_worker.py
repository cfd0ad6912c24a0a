"""A TP worker process (ranks 1..N-1 of a DP rank's tensor-parallel group).

It joins the group, builds its ``Worker`` (its shard of the weights and of the KV
heads), says READY to the executor, then runs every plan it receives. It runs each
step to its end before taking the next plan: its rows then hold the sampled tokens
on the host, which gives the same inputs as rank 0's pending tokens, so one rank may
schedule asynchronously while the others do not.

Frames from the executor: ``[STEP, plan bytes]`` or ``[QUIT]``; to it: ``[READY]``
or ``[ERROR, text]`` when start-up fails.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch
import zmq

from engine.config import EngineConfig, rank_device
from engine.distributed import GroupAddress, join_group
from engine.kv_cache import allocate_kv_cache
from engine.plan_codec import decode_plan

logger = logging.getLogger("engine.tp_worker")

STEP, QUIT, READY, ERROR = b"S", b"Q", b"R", b"E"
_PARENT_POLL_S = 0.5


def run_tp_worker(
    config: EngineConfig, rank: int, address: GroupAddress, channel: str, num_threads: int
) -> None:
    logging.basicConfig(
        level=logging.getLogger().getEffectiveLevel(),
        format=f"%(asctime)s tp-worker-{rank} %(message)s",
    )
    torch.set_num_threads(num_threads)
    _exit_with_parent(os.getppid())
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(channel)
    try:
        from engine.worker import Worker  # after the threads are set

        group = join_group(address, rank, rank_device(config.device, rank))
        worker = Worker(config, group, allocate_kv_cache)
    except Exception as error:
        logger.exception("TP worker %d failed to start", rank)
        socket.send_multipart([ERROR, f"rank {rank}: {error}".encode()])
        socket.close()
        raise SystemExit(1) from error
    socket.send_multipart([READY])
    while True:
        kind, *payload = socket.recv_multipart()
        if kind == QUIT:
            break
        if kind != STEP:
            raise SystemExit(f"TP worker {rank}: unknown frame {kind!r} from the executor")
        worker.result(worker.submit(decode_plan(payload[0])))
    socket.close()
    context.term()


def _exit_with_parent(parent_pid: int) -> None:
    """Leave no orphan: when the engine process is gone (even killed), so is this one."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
