"""One TP rank's end of the KV hand-off: built on every TP rank of a prefill or decode
engine as a worker extension (``engine.executor``), so that each rank moves its own KV
shard (its heads) with its own transfer engines and endpoints.

    decode rank   each TP rank listens: ``endpoints()`` is published (Reserve's reply
                  carries one per rank), ``allow``/``revoke`` open and close a transfer
                  on every rank's receiver
    prefill rank  each TP rank writes: the step plan's ``KVSend``s, layer by layer as
                  the worker computes them (with equal TP sizes TP rank i into the
                  peer's TP rank i; else each peer rank's heads from the first rank
                  that holds them, ``cache_transfer.tp_heads``), and
                  ``send_all`` for a retry from parked blocks; ``flush`` then waits for
                  a transfer's writes on this rank and reports the outcome through
                  ``notify`` (a ``WriteReport``)

Connections to a peer are made at its first write (a failure is that transfer's
error, reported at its flush), so rank 0 never waits on the other ranks to connect.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cache_transfer.regions import BlockRuns, Regions, block_runs, head_slice_regions, layer_regions
from cache_transfer.tp_heads import HeadWrite, head_writes, rank_heads
from cache_transfer.transfer_engine import TransferError, TransferHandle, wait_all
from engine.kv_cache import KVCacheLayout
from engine.plan_codec import send_from_wire
from engine.step_plan import KVSend, KVTarget
from pd.rank.transfer_setup import make_transfer_engines

logger = logging.getLogger(__name__)

WriteKey = tuple[str, bytes]  # (peer_key, transfer_id)


@dataclass(frozen=True)
class WriteReport:
    """One TP rank's word on its writes of one transfer; crosses to rank 0 as a msgpack
    array of these fields in this order (``to_wire`` / ``from_wire``)."""

    peer_key: str
    transfer_id: bytes
    tp_rank: int
    error: str | None  # None: every byte landed
    num_bytes: int
    seconds: float  # from the first write to the last byte landed

    def to_wire(self) -> list:
        return list(dataclasses.astuple(self))

    @classmethod
    def from_wire(cls, wire: list) -> WriteReport:
        return cls(*wire)


@dataclass
class _Writes:
    """This rank's writes of one transfer so far."""

    handles: list[TransferHandle] = field(default_factory=list)
    num_bytes: int = 0
    started_at: float | None = None
    error: str | None = None


class RankTransfer:
    def __init__(
        self,
        worker: Any,
        notify: Any,
        role: str,
        protocols: list[str],
        host: str,
        rdma_comm_ports: list[int],
        timeout_s: float,
        secret: bytes | None,
        session: bytes,
    ):
        self.tp_rank, self.tp_size = worker.group.rank, worker.group.size
        self.total_kv_heads = worker.config.model.num_key_value_heads
        runner = worker.runner
        self.layout: KVCacheLayout = runner.layout
        # A decode rank on CPU that offers ipc keeps its pool in shared memory: the
        # allocator (pd.rank.transfer_setup.KVPool) knows the file.
        shm_path = getattr(runner.allocate_kv, "shm_path", None)
        rdma_port = rdma_comm_ports[self.tp_rank] if rdma_comm_ports else 0
        self.engines = make_transfer_engines(
            role, runner.kv_cache, self.layout, protocols, host, shm_path, rdma_port, secret,
            session,
        )  # fmt: skip
        self.notify = notify
        self.timeout_s = timeout_s
        self._writes: dict[WriteKey, _Writes] = {}
        self._connected: set[tuple[str, str]] = set()  # (protocol, peer id)
        self._head_plans: dict[int, list[HeadWrite]] = {}  # peer TP size -> our writes
        # (peer blocks, peer TP size, peer rank) -> its layout: asked per layer and send
        self._peer_layouts: dict[tuple[int, int, int], KVCacheLayout] = {}
        self._step_runs: tuple[list[KVSend], list[tuple[KVSend, BlockRuns]]] | None = None
        self._flushes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-flush")
        # The engine loop writes; with TP 1 a hand-off thread may too (a retry).
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()  # Reserve connects from hand-off threads
        if role == "prefill":
            worker.kv_sender = self.send_layer

    # -- decode: receiving ---------------------------------------------------------------

    def endpoints(self) -> dict[str, dict]:
        return {protocol: engine.endpoint() for protocol, engine in self.engines.items()}

    def allow(self, protocol: str, transfer_id: bytes, byte_ranges: list[list[int]]) -> None:
        self.engines[protocol].allow(transfer_id, [(start, end) for start, end in byte_ranges])

    def revoke(self, protocol: str, transfer_id: bytes) -> None:
        self.engines[protocol].revoke(transfer_id)

    # -- prefill: sending ----------------------------------------------------------------

    def send_layer(self, layer: int, sends: list[KVSend]) -> None:
        """The worker's KV sender: ``layer``'s K and V of this step's ``sends``."""
        if self._step_runs is None or self._step_runs[0] is not sends:
            runs = [(send, block_runs(send.src_block_ids, send.dst_block_ids)) for send in sends]
            self._step_runs = (sends, runs)  # once per step, at its first layer
        for send, runs in self._step_runs[1]:
            self._send(send.target, runs, [layer])

    def send_all(self, wire_sends: list[list]) -> None:
        """Every layer of ``sends`` at once (a retry from a request's parked blocks)."""
        for send in map(send_from_wire, wire_sends):
            runs = block_runs(send.src_block_ids, send.dst_block_ids)
            self._send(send.target, runs, range(self.layout.num_layers))

    def connect(self, protocol: str, peer_key: str, endpoints: list[dict]) -> None:
        """Connect now to every peer TP rank this rank will write to (at Reserve, off the
        step path, so that a peer that cannot be reached is known before any write)."""
        target = KVTarget(protocol, peer_key, b"", 0, endpoints)
        for write in self._head_writes(len(endpoints)):
            self._connect(target, write.dst_rank)

    def flush(self, peer_key: str, transfer_id: bytes) -> None:
        """Report this transfer's writes on this rank once they have all landed (or
        failed); later writes of it would open a new record."""
        with self._lock:
            writes = self._writes.pop((peer_key, transfer_id), None) or _Writes()
        self._flushes.submit(self._report, peer_key, transfer_id, writes)

    def _send(self, target: KVTarget, runs: BlockRuns, layers: Iterable[int]) -> None:
        """This rank's heads of ``layers`` into every peer TP rank that needs them: the
        same rank with equal TP sizes, whole blocks; else head slices (tp_heads)."""
        with self._lock:
            writes = self._writes.setdefault((target.peer_key, target.transfer_id), _Writes())
            if writes.error is not None:
                return
            try:
                for write in self._head_writes(len(target.endpoints)):
                    regions = self._regions(target, write, runs, layers)
                    engine, peer_id = self._connect(target, write.dst_rank)
                    if writes.started_at is None:
                        writes.started_at = time.monotonic()
                    writes.handles.append(engine.write(peer_id, target.transfer_id, regions))
                    writes.num_bytes += regions.total_bytes
            except Exception as e:  # the transfer fails (reported at flush), not the rank
                if not isinstance(e, (TransferError, ValueError, OSError)):
                    logger.exception("TP rank %d: writing %s failed", self.tp_rank, target.peer_key)
                writes.error = str(e)

    def _regions(
        self, target: KVTarget, write: HeadWrite, runs: BlockRuns, layers: Iterable[int]
    ) -> Regions:
        """Whole blocks when both sides hold the same heads, else per-token head slices."""
        peer = self._peer_layout(target, write.dst_rank)
        if write.count == self.layout.num_kv_heads == peer.num_kv_heads:
            return Regions.concat([layer_regions(self.layout, peer, runs, n) for n in layers])
        return Regions.concat([
            head_slice_regions(self.layout, peer, runs, layer, write.src_first, write.dst_first,
                               write.count)
            for layer in layers
        ])  # fmt: skip

    def _head_writes(self, peer_tp: int) -> list[HeadWrite]:
        if peer_tp not in self._head_plans:
            self._head_plans[peer_tp] = head_writes(
                self.total_kv_heads, self.tp_size, self.tp_rank, peer_tp
            )
        return self._head_plans[peer_tp]

    def _peer_layout(self, target: KVTarget, peer_rank: int) -> KVCacheLayout:
        key = (target.peer_num_blocks, len(target.endpoints), peer_rank)
        if key not in self._peer_layouts:
            heads = rank_heads(self.total_kv_heads, len(target.endpoints), peer_rank)
            self._peer_layouts[key] = dataclasses.replace(
                self.layout, num_blocks=target.peer_num_blocks, num_kv_heads=len(heads)
            )
        return self._peer_layouts[key]

    def _connect(self, target: KVTarget, peer_rank: int):  # type: ignore[no-untyped-def]
        """The engine and its name for the peer's TP rank ``peer_rank``, connected."""
        engine = self.engines.get(target.protocol)
        if engine is None:
            raise TransferError(f"TP rank {self.tp_rank} has no {target.protocol} engine")
        peer_id = f"{target.peer_key}#{peer_rank}"
        with self._connect_lock:  # connects only: writes to connected peers go on
            if (target.protocol, peer_id) not in self._connected:
                engine.connect(peer_id, target.endpoints[peer_rank])
                self._connected.add((target.protocol, peer_id))
        return engine, peer_id

    def _report(self, peer_key: str, transfer_id: bytes, writes: _Writes) -> None:
        error = writes.error
        if error is None:
            try:
                wait_all(writes.handles, self.timeout_s)
            except TransferError as e:
                error = str(e)
        seconds = 0.0 if writes.started_at is None else time.monotonic() - writes.started_at
        if error is not None:
            error = f"TP rank {self.tp_rank}: {error}"
        report = WriteReport(peer_key, transfer_id, self.tp_rank, error, writes.num_bytes, seconds)
        self.notify(report.to_wire())

    def close(self) -> None:
        self._flushes.shutdown(wait=False, cancel_futures=True)
        for engine in self.engines.values():
            engine.close()
