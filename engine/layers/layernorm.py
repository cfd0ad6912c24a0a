"""RMSNorm, computed in float32 like the HF reference.

On CUDA the forwards run fused Triton kernels (engine/kernels/fused_ops.py) that round
where ``forward_torch`` does; only the order of the mean's sum differs.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import can_run_triton


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if can_run_triton(x):
            from engine.kernels import fused_ops  # NOTE: lazily: CPU-only installs lack triton

            return fused_ops.rms_norm(x, self.weight, self.eps)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """The reference formula: the CPU path, and what the CUDA kernels reproduce."""
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def forward_with_residual(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual): the pre-norm block pattern.

        On CUDA this runs in place: the results are written into residual's and x's
        storage, so callers must not read the x and residual they passed afterwards.
        """
        if can_run_triton(x):
            from engine.kernels import fused_ops  # NOTE: lazily: CPU-only installs lack triton

            return fused_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        residual = x + residual
        return self.forward(residual), residual
