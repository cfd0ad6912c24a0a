"""The interface every KV-transfer backend implements, and the handle of one write.

A rank registers its KV pool once. The receiving side (decode) publishes an
``endpoint()`` descriptor (returned by pd-comm's Reserve); the sending side (prefill)
``connect``s to it once per peer, then submits ``write``s — typically one per layer, as
soon as that layer's KV is computed, so transfers overlap the next layers' compute.
A write is asynchronous: it returns a ``TransferHandle`` to wait on (with a timeout) or
cancel. Writes to one peer land in submission order per backend stream; a request's
transfer is complete when the handles of all its writes are.

Receivers accept writes only into byte ranges opened for a transfer id
(``allow``/``revoke``), so a late or stray write can never land in blocks that were
released and handed to another request.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from cache_transfer.regions import Region
from engine.kv_cache import KVCacheLayout

TRANSFER_ID_BYTES = 16  # random: a transfer id cannot be guessed, only learned at Reserve


class TransferError(RuntimeError):
    """A write failed; the message says which peer and why."""


class TransferTimeout(TransferError):
    """A write did not complete within its deadline."""


class TransferCancelled(TransferError):
    """A write was cancelled before it completed."""


class TransferHandle:
    """Completion of one write: set by the backend, awaited by the caller."""

    def __init__(self, description: str, num_parts: int = 1):
        self.description = description
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._remaining = num_parts
        self._error: TransferError | None = None
        if num_parts == 0:
            self._done.set()

    def part_done(self) -> None:
        with self._lock:
            self._remaining -= 1
            if self._remaining <= 0:
                self._done.set()

    def fail(self, error: TransferError) -> None:
        with self._lock:
            if self._error is None:
                self._error = error
            self._done.set()

    def cancel(self) -> None:
        self.fail(TransferCancelled(f"{self.description}: cancelled"))

    @property
    def is_done(self) -> bool:
        return self._done.is_set()

    @property
    def is_cancelled(self) -> bool:
        return isinstance(self._error, TransferCancelled)

    def wait(self, timeout_s: float | None = None) -> None:
        """Return once every byte has landed; raise TransferError otherwise."""
        if not self._done.wait(timeout_s):
            self.fail(TransferTimeout(f"{self.description}: not done after {timeout_s} s"))
        if self._error is not None:
            raise self._error


def wait_all(handles: Sequence[TransferHandle], timeout_s: float) -> None:
    """Wait for several writes under one overall deadline; cancel the rest on failure."""
    deadline = time.monotonic() + timeout_s
    try:
        for handle in handles:
            handle.wait(max(deadline - time.monotonic(), 0.0))
    except TransferError:
        for handle in handles:
            if not handle.is_done:
                handle.cancel()
        raise


class TransferEngine(ABC):
    """One rank's transfer endpoint for one protocol."""

    protocol: str

    def __init__(self, pool: torch.Tensor, layout: KVCacheLayout):
        if tuple(pool.shape) != layout.shape or pool.dtype != layout.dtype:
            raise ValueError(f"pool {tuple(pool.shape)} {pool.dtype} does not match {layout}")
        if not pool.is_contiguous():
            raise ValueError("the KV pool must be one contiguous tensor")
        self.pool = pool
        self.layout = layout
        # transfer id -> (range starts, range ends), sorted by start
        self._allowed: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        # transfer id -> the authenticated session whose bytes it takes (its first writer)
        self._sessions: dict[bytes, bytes] = {}
        self._allowed_lock = threading.Lock()

    # -- receiving side -------------------------------------------------------------

    @abstractmethod
    def endpoint(self) -> dict:
        """What a peer needs to reach this pool (msgpack-able; travels in Reserve's reply)."""

    def endpoints(self) -> list[dict]:
        """One per TP rank of the receiving engine: just this pool's."""
        return [self.endpoint()]

    def allow(self, transfer_id: bytes, byte_ranges: Sequence[tuple[int, int]]) -> None:
        """Accept writes of ``transfer_id`` into these [start, end) ranges of the pool.
        NOTE: rdma writes and ipc writes on CPU (into shared memory) are one-sided: the
        receiver cannot refuse them, so there this documents intent and the lease
        (pd-comm) bounds exposure. tcp and ipc on CUDA (a pull) check every write."""
        ranges = np.array(sorted(byte_ranges), dtype=np.int64).reshape(-1, 2)
        with self._allowed_lock:
            self._allowed[transfer_id] = (ranges[:, 0].copy(), ranges[:, 1].copy())

    def revoke(self, transfer_id: bytes) -> None:
        """Stop accepting writes of ``transfer_id`` (committed, aborted or expired).
        Returns once none of its writes can still land."""
        with self._allowed_lock:
            self._allowed.pop(transfer_id, None)
            self._sessions.pop(transfer_id, None)

    def check_allowed(self, transfer_id: bytes, offset: int, nbytes: int) -> str | None:
        """None if a write of [offset, offset + nbytes) may land; else why not."""
        return self.check_allowed_regions(transfer_id, np.array([offset]), np.array([nbytes]))

    def check_allowed_regions(
        self, transfer_id: bytes, offsets: np.ndarray, nbytes: np.ndarray, session: bytes = b""
    ) -> str | None:
        """None if every write [offsets[i], offsets[i] + nbytes[i]) may land; else why
        the first that may not cannot. Overflow-safe: sizes are compared with the room
        left in their range (``end - offset``), never summed with the offset. A
        ``session`` (an authenticated sender) binds the transfer to itself on first use."""
        offsets, nbytes = _as_int64(offsets), _as_int64(nbytes)
        if offsets is None or nbytes is None:
            return "an offset or size does not fit in 63 bits"
        with self._allowed_lock:
            allowed = self._allowed.get(transfer_id)
            if allowed is not None and session:
                owner = self._sessions.setdefault(transfer_id, session)
                if owner != session:
                    return f"transfer {transfer_id.hex()[:8]} is being written by another sender"
        if allowed is None:
            name = transfer_id.hex()[:8]
            return f"transfer {name} is not open (never reserved, committed or aborted)"
        starts, ends = allowed
        i = np.searchsorted(starts, offsets, side="right") - 1  # the range at or before
        end = ends[np.maximum(i, 0)] if len(ends) else np.zeros_like(offsets)
        inside = (i >= 0) & (offsets >= 0) & (nbytes > 0) & (nbytes <= end - offsets)
        if inside.all():
            return None
        k = int(np.argmin(inside))
        start, end = int(offsets[k]), int(offsets[k]) + int(nbytes[k])  # Python ints
        return f"bytes [{start}, {end}) are outside transfer {transfer_id.hex()[:8]}'s blocks"

    # -- sending side ---------------------------------------------------------------

    @abstractmethod
    def connect(self, peer_id: str, endpoint: dict) -> None:
        """Prepare to write into the pool behind ``endpoint`` (idempotent per peer)."""

    @abstractmethod
    def write(self, peer_id: str, transfer_id: bytes, regions: Sequence[Region]) -> TransferHandle:
        """Copy ``regions`` of the local pool into the peer's pool, asynchronously."""

    @abstractmethod
    def close(self) -> None:
        """Release sockets, mappings and threads."""


def _as_int64(values: np.ndarray) -> np.ndarray | None:
    """``values`` as int64, or None when one is out of [-2**63, 2**63) (e.g. a uint64
    from a frame header) or not an integer."""
    values = np.asarray(values)
    if values.dtype.kind == "i":
        return values.astype(np.int64, copy=False)
    if values.dtype.kind == "u":
        if len(values) and int(values.max()) >= 2**63:
            return None
        return values.astype(np.int64)
    if values.dtype == object:
        if any(type(v) is not int or not -(2**63) <= v < 2**63 for v in values.tolist()):
            return None
        return values.astype(np.int64)
    return None
