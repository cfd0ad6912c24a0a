from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import can_run_triton


class SiluAndMul(nn.Module):
    """silu(gate) * up for an input laid out as [..., gate | up].

    On CUDA one Triton kernel (engine/kernels/fused_ops.py) computes it bit for bit as
    ``forward_torch`` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if can_run_triton(x):
            from engine.kernels import fused_ops  # NOTE: lazily: CPU-only installs lack triton

            return fused_ops.silu_and_mul(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The reference formula: the CPU path, and what the CUDA kernel reproduces."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
