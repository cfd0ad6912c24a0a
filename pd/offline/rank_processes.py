"""The engine-core processes of an offline ``LLM``'s DP ranks: one per rank, started as
``pd-serve`` starts its engines (``pd/engine_process.py``), each with a ``RankLink``.

The ``LLM`` process plays the API server's part: the engines stop when it asks
(SHUTDOWN, then by force) or when it is gone. Between generate calls nobody reads the
links, so a daemon thread takes their messages (the engines send STATS every 100 ms)
into each link's inbox; a lock keeps it and the caller off a socket at the same time.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from pd.args import pick_free_port
from pd.cpu_threads import engine_thread_choice
from pd.engine_messages import Kind
from pd.offline.rank_link import RankLink

if TYPE_CHECKING:
    from pd.rank.settings import RankSettings

logger = logging.getLogger("pd.llm")

READY_TIMEOUT_S = 1800.0  # as pd-serve: loading a big checkpoint is slow
STOP_TIMEOUT_S = 10.0  # after SHUTDOWN (a splitwise rank drains for up to 8 s)
_IDLE_RECEIVE_S = 0.5


class RankDied(RuntimeError):
    """An engine-core process of the LLM's DP ranks exited."""


class RankProcesses:
    def __init__(
        self,
        rank_kwargs: dict[int, dict[str, Any]],
        queue_ports: list[int],
        channel_key: bytes,
        settings: list[RankSettings] | None = None,
    ):
        """Start an engine process for each DP rank of ``rank_kwargs`` (its engine
        keywords), listening on its queue port (0: a free one); ``settings``: each
        rank's ``RankSettings`` in a splitwise cluster. Returns once every model is
        loaded; raises RankDied (and stops the others) when one fails to start."""
        from pd.engine_process import run_engine_process

        dp_ranks = list(rank_kwargs)
        tp_size = rank_kwargs[dp_ranks[0]]["tensor_parallel_size"]
        threads = engine_thread_choice(0, num_engines=len(dp_ranks) * tp_size, num_api_servers=1)
        log_level = logging.getLevelName(logging.getLogger("pd").getEffectiveLevel()).lower()
        self.context = zmq.Context()
        self.processes: list[multiprocessing.Process] = []
        self.links: list[RankLink] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller = zmq.Poller()
        try:
            for index, dp_rank in enumerate(dp_ranks):
                address = f"tcp://127.0.0.1:{queue_ports[index] or pick_free_port()}"
                process = multiprocessing.get_context("spawn").Process(
                    target=run_engine_process,
                    args=(rank_kwargs[dp_rank], address, log_level, threads,
                          None if settings is None else settings[index], channel_key),
                    name=f"pd-llm-engine-{dp_rank}",
                    daemon=False,  # it starts TP worker processes; close() and atexit stop it
                )  # fmt: skip
                process.start()
                logger.info("DP rank %d: engine pid %d on %s", dp_rank, process.pid, address)
                self.processes.append(process)
                self.links.append(RankLink(self.context, address, dp_rank, channel_key))
                self._poller.register(self.links[-1].socket, zmq.POLLIN)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self._receiver = threading.Thread(target=self._receive_while_idle, daemon=True)
        self._receiver.start()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while any(link.info is None for link in self.links):
            self.check_alive("during start-up")
            if time.monotonic() > deadline:
                raise RankDied(f"the DP ranks were not ready within {READY_TIMEOUT_S:.0f} s")
            self.poll(0.2)

    def check_alive(self, when: str = "") -> None:
        """Raise RankDied when an engine process has exited."""
        for link, process in zip(self.links, self.processes, strict=True):
            if not process.is_alive():
                raise RankDied(
                    f"the engine process of DP rank {link.dp_rank} exited {when}".rstrip()
                    + f" (exit code {process.exitcode}; its log says why)"
                )

    def poll(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a message from any rank, then take what came."""
        with self._lock:
            self._poller.poll(int(timeout_s * 1000))
            for link in self.links:
                link.receive()

    def send(self, link: RankLink, kind: Kind, payload: Any = None) -> None:
        with self._lock:
            link.send(kind, payload)

    def _receive_while_idle(self) -> None:
        while not self._stop.wait(_IDLE_RECEIVE_S):
            with self._lock:
                if self._stop.is_set():
                    return
                for link in self.links:
                    link.receive()

    def close(self) -> None:
        """Ask every engine to stop, then stop those that do not in time; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            # NOTE: not strict: a start-up that failed may have a process without a link.
            for link, process in zip(self.links, self.processes, strict=False):
                if process.is_alive():
                    link.send(Kind.SHUTDOWN)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.warning("engine process %d did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
        with self._lock:
            for link in self.links:
                link.close()
        self.context.term()
