"""The engine's real BlockManager behind pd-comm's BlockAllocator protocol, with a lock
(pd-comm calls arrive on gRPC threads)."""

from __future__ import annotations

import threading

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


class EngineBlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.sequences: dict[str, Sequence] = {}
        self.lock = threading.Lock()

    def reserve(self, request_id: str, num_tokens: int) -> list[int] | None:
        seq = Sequence(request_id, [0] * num_tokens, SamplingParams(max_tokens=1), arrival=0)
        with self.lock:
            if not self.block_manager.can_allocate(seq, num_tokens):
                return None
            self.block_manager.allocate(seq, num_tokens)
            self.sequences[request_id] = seq
            return list(seq.block_ids)

    def release(self, request_id: str) -> None:
        with self.lock:
            seq = self.sequences.pop(request_id, None)
            if seq is not None:
                self.block_manager.free(seq)

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    @property
    def block_size(self) -> int:
        return self.block_manager.block_size

    def check(self) -> None:
        with self.lock:
            self.block_manager.check_invariants(live=list(self.sequences.values()))
