"""A decode rank's side of the KV hand-off: the pd-comm service, with reservations taken
from the engine's block manager and commits joining the engine's running batch.

Both run on the engine loop (``LoopCalls``), never on gRPC threads, so the block
manager and the engine stay single-threaded:

    Reserve -> allocate_blocks(n) on the loop        (leased; Abort/expiry frees them)
    Commit  -> adopt on the loop: T:proc entry (the reaper's hold on us), then the engine
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cache_transfer.pd_comm import CommitRefused, PdCommServer, PdCommService
from cache_transfer.transfer_engine import TransferEngine
from engine.block_manager import BlockManager
from pd.rank.loop_calls import CALL_TIMEOUT_S, LoopCalls, LoopCallTimeout
from proto import pd_comm_pb2 as pb

logger = logging.getLogger(__name__)


class LoopBlockAllocator:
    """pd-comm's BlockAllocator over the engine's block manager, run on the engine loop."""

    def __init__(self, block_manager: BlockManager, calls: LoopCalls):
        self.block_manager = block_manager
        self.calls = calls
        self.reserved: dict[str, list[int]] = {}  # loop thread only

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        def allocate() -> list[int] | None:
            num_blocks = self.block_manager.num_blocks_for(num_tokens)
            block_ids = self.block_manager.allocate_blocks(num_blocks)
            if block_ids is not None:
                self.reserved[request_id] = block_ids
            return block_ids

        try:
            return self.calls.call(allocate, CALL_TIMEOUT_S)
        except LoopCallTimeout:
            return None  # answered as "no room": the prefill rank tries elsewhere

    def release(self, request_id: str) -> None:
        def free() -> None:
            block_ids = self.reserved.pop(request_id, None)
            if block_ids is not None:
                self.block_manager.free_blocks(block_ids)

        self.calls.post(free)

    def hand_over(self, request_id: str) -> list[int]:
        """The blocks of a committed reservation, now the engine's (loop thread)."""
        return self.reserved.pop(request_id)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def block_size(self) -> int:
        return self.block_manager.block_size


# Runs on the loop: takes over a committed request, or raises CommitRefused.
Adopt = Callable[[pb.CommitRequest, list[int]], None]


class DecodeIntake:
    def __init__(
        self,
        rank_id: str,
        fingerprint: pb.KvFingerprint,
        block_manager: BlockManager,
        engines: dict[str, TransferEngine],
        calls: LoopCalls,
        adopt: Adopt,
        host: str,
        port: int,
        lease_s: float,
        secret: bytes | None = None,
        max_num_tokens: int = 1 << 20,
        on_abort: Callable[[str], None] | None = None,
    ):
        """``on_abort``: run on the loop for every pd-comm Abort, after its reservation
        (if any) is released: without Redis, it is how an owner aborts a committed
        request."""
        self.calls = calls
        self.adopt = adopt
        self.allocator = LoopBlockAllocator(block_manager, calls)
        self.service = PdCommService(
            rank_id, fingerprint, self.allocator, engines, self._on_commit, lease_s=lease_s,
            max_num_tokens=max_num_tokens,
            on_abort=None if on_abort is None else (
                lambda request_id: calls.post(lambda: on_abort(request_id))
            ),
        )  # fmt: skip
        self.server = PdCommServer(self.service, host=host, port=port, secret=secret)
        self.port = self.server.port
        logger.info("pd-comm (decode %s) on %s:%d", rank_id, host, self.port)

    def _on_commit(self, request: pb.CommitRequest, block_ids: list[int]) -> None:
        """gRPC thread: adopt on the loop. The reservation has ended, so on refusal
        pd-comm releases the blocks through the allocator (still holding them)."""

        def adopt() -> None:
            self.adopt(request, block_ids)
            self.allocator.hand_over(request.request_id)

        try:
            self.calls.call(adopt, CALL_TIMEOUT_S)
        except LoopCallTimeout as e:
            raise CommitRefused(str(e)) from None

    def close(self) -> None:
        self.server.stop(grace_s=0.5)
