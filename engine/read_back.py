"""Sampled token ids back to the host without stalling the next step's launch.

On CUDA the copy goes into one of two pinned buffers, with an event: a step can be
submitted while the previous one's tokens are still on their way (two in flight at
most: the scheduler waits for a step before it submits the one after next).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Copy:
    host: torch.Tensor
    event: torch.cuda.Event | None
    count: int


class TokenReadBack:
    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def start(self, token_ids: torch.Tensor) -> _Copy:
        count = token_ids.numel()
        if self.device.type != "cuda":
            return _Copy(token_ids, None, count)
        host = self._buffer(count)[:count]
        host.copy_(token_ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Copy(host, event, count)

    def wait(self, copy: object) -> list[int]:
        assert isinstance(copy, _Copy)
        if copy.event is not None:
            copy.event.synchronize()
        return copy.host.tolist()

    def _buffer(self, count: int) -> torch.Tensor:
        if not self._buffers or self._buffers[0].numel() < count:
            size = max(count, 256)
            self._buffers = [
                torch.empty(size, dtype=torch.int64, pin_memory=True) for _ in range(2)
            ]
        self._next ^= 1
        return self._buffers[self._next]
