"""Decode-side bookkeeping of pd-comm: blocks reserved for a prefill rank's write, each
under a lease. A reservation ends one of three ways: Commit hands its blocks to the
engine, Abort releases them, or the lease runs out and the decode rank releases them
itself — so a prefill rank that dies never leaks decode blocks.

Nothing renews a lease: a reservation lives at most ``lease_s`` from its Reserve. One
peer (a prefill rank id) may hold at most ``max_peer_fraction`` of the pool in
reservations at once (its first reservation always fits), so no single peer can book
every block. Transfer ids are random, never a counter a peer could learn and predict."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)


class BlockAllocator(Protocol):
    """The decode engine's side: blocks for a request that is about to arrive."""

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Block ids holding ``num_tokens`` tokens, or None when there is no room."""

    def release(self, request_id: str) -> None:
        """Free what ``reserve`` gave ``request_id``."""

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def num_blocks(self) -> int:
        """The pool's size."""

    @property
    def block_size(self) -> int: ...


class PeerLimit(Exception):
    """A peer already holds as many blocks in reservations as one peer may."""


def new_transfer_id() -> bytes:
    """A random, unguessable transfer id: 128 bits."""
    return secrets.token_bytes(16)


@dataclass
class Reservation:
    request_id: str
    transfer_id: bytes
    block_ids: list[int]
    protocol: str
    expires_at: float
    num_tokens: int = 0
    peer: str = ""


class Reservations:
    def __init__(
        self,
        allocator: BlockAllocator,
        lease_s: float,
        on_end: Callable[[Reservation], None] = lambda r: None,
        max_peer_fraction: float = 1.0,
    ):
        self.allocator = allocator
        self.lease_s = lease_s
        self.max_peer_fraction = max_peer_fraction
        self._peer_blocks: dict[str, int] = {}  # peer -> blocks it holds in reservations
        self.on_end = on_end  # called once per reservation that ends (revoke transfers)
        self._lock = threading.Lock()
        self._by_request: dict[str, Reservation] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._expire_loop, name="pd-leases", daemon=True)
        self._thread.start()
        self.num_expired = 0

    def reserve(
        self, request_id: str, num_tokens: int, protocol: str, peer: str = ""
    ) -> Reservation | None:
        """A new reservation, or None when there is no room; ValueError on a duplicate,
        PeerLimit when ``peer`` holds its share of the pool already."""
        with self._lock:
            if request_id in self._by_request:
                raise ValueError(f"request {request_id} already holds a reservation")
            held = self._peer_blocks.get(peer, 0)
            limit = int(self.allocator.num_blocks * self.max_peer_fraction)
            num_blocks = -(-num_tokens // self.allocator.block_size)
            if held and held + num_blocks > limit:
                raise PeerLimit(
                    f"{peer or 'this peer'} holds {held} blocks in reservations; one peer "
                    f"may hold at most {limit}"
                )
            block_ids = self.allocator.reserve(request_id, num_tokens)
            if block_ids is None:
                return None
            reservation = Reservation(
                request_id, new_transfer_id(), block_ids, protocol,
                time.monotonic() + self.lease_s, num_tokens, peer,
            )  # fmt: skip
            self._by_request[request_id] = reservation
            self._peer_blocks[peer] = held + len(block_ids)
            return reservation

    def _forget(self, reservation: Reservation) -> None:
        """Drop a reservation from the per-peer count (lock held)."""
        left = self._peer_blocks.get(reservation.peer, 0) - len(reservation.block_ids)
        if left > 0:
            self._peer_blocks[reservation.peer] = left
        else:
            self._peer_blocks.pop(reservation.peer, None)

    def take(self, request_id: str, transfer_id: bytes) -> Reservation | None:
        """End a reservation by handing its blocks over (Commit); None if it is gone."""
        with self._lock:
            reservation = self._by_request.get(request_id)
            if reservation is None or reservation.transfer_id != transfer_id:
                return None
            del self._by_request[request_id]
            self._forget(reservation)
        self.on_end(reservation)
        return reservation

    def release(self, request_id: str) -> bool:
        with self._lock:
            reservation = self._by_request.pop(request_id, None)
            if reservation is not None:
                self._forget(reservation)
        if reservation is None:
            return False
        # Revoke first: on_end returns once no write of the transfer can still land, so
        # the blocks are quiet before another request may get them.
        self.on_end(reservation)
        self.allocator.release(request_id)
        return True

    def __len__(self) -> int:
        return len(self._by_request)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for request_id in list(self._by_request):
            self.release(request_id)

    def _expire_loop(self) -> None:
        while not self._stop.wait(min(self.lease_s / 4, 0.25)):
            now = time.monotonic()
            with self._lock:
                expired = [r for r in self._by_request.values() if r.expires_at <= now]
            for reservation in expired:
                try:
                    released = self.release(reservation.request_id)
                except Exception:  # a revoke that failed must not end lease expiry
                    logger.exception("pd-comm: releasing %s failed", reservation.request_id)
                    continue
                if released:
                    self.num_expired += 1
                    logger.warning(
                        "pd-comm: reservation of %s (%d blocks) expired after %.1f s without "
                        "Commit; blocks released", reservation.request_id,
                        len(reservation.block_ids), self.lease_s,
                    )  # fmt: skip
