"""Tensor-parallel linear layers; each parameter loads its own shard.

Column-parallel layers split the output features over TP ranks, row-parallel
layers split the input features and all-reduce the result. Every parameter
carries ``weight_loader(param, loaded, shard_id=None)`` which takes the full
checkpoint tensor and copies in this rank's slice, so models never slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import ParallelGroup
from engine.kernels import can_run_triton

GEMV_DTYPES = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear``; on CUDA, one row of 16-bit activations (batch-1 decode) runs our
    GEMV instead, which reads the weight nearer the HBM rate than cuBLAS does
    (engine/kernels/gemv.py). float32 stays on torch: the parity references use it."""
    if (
        x.dim() == 2
        and x.shape[0] == 1
        and weight.dtype in GEMV_DTYPES
        and x.dtype == weight.dtype
        and weight.stride(1) == 1
        and can_run_triton(x)
    ):
        from engine.kernels import gemv  # NOTE: lazily: CPU-only installs lack triton

        return gemv.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the TP size ({denominator})")
    return numerator // denominator


def num_local_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    """KV heads one TP rank holds: a share of them, or one replicated head when there
    are more ranks than KV heads (ranks r*k..r*k+k-1 share head r for k = tp / heads)."""
    if num_kv_heads >= tp_size:
        return _divide(num_kv_heads, tp_size, "num_key_value_heads")
    _divide(tp_size, num_kv_heads, "TP size over num_key_value_heads")
    return 1


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp: ParallelGroup):
        super().__init__()
        self.tp = tp
        self.tp_rank = tp.rank
        self.tp_size = tp.size
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, ParallelGroup.single())

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded)


class ColumnParallelLinear(LinearBase):
    """y = x A^T with A split by rows (output features) over TP ranks."""

    def __init__(self, input_size: int, output_size: int, tp: ParallelGroup, bias: bool = False):
        local = _divide(output_size, tp.size, "output size")
        super().__init__(input_size, local, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.data.size(0)
        param.data.copy_(loaded.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stacked into one matmul
    (e.g. gate_proj and up_proj); ``shard_id`` is the index of the projection."""

    def __init__(
        self, input_size: int, output_sizes: list[int], tp: ParallelGroup, bias: bool = False
    ):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), tp, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        tp_size = self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // tp_size
        size = self.output_sizes[shard_id] // tp_size
        target = param.data.narrow(0, offset, size)
        target.copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, heads split over TP ranks.

    Local output layout: [q heads | k heads | v heads] of this rank;
    ``shard_id`` is "q", "k" or "v".
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        tp: ParallelGroup,
        bias: bool,
    ):
        tp_size = tp.size
        self.head_dim = head_dim
        self.num_local_heads = _divide(num_heads, tp_size, "num_attention_heads")
        # With more TP ranks than KV heads, each KV head is replicated over ranks.
        self.num_kv_head_replicas = max(1, tp_size // num_kv_heads)
        self.num_local_kv_heads = num_local_kv_heads(num_kv_heads, tp_size)
        full_out = (self.num_local_heads + 2 * self.num_local_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, full_out, tp, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        q_size = self.num_local_heads * self.head_dim
        kv_size = self.num_local_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size = kv_size
            rank = self.tp_rank // self.num_kv_head_replicas
        target = param.data.narrow(0, offset, size)
        target.copy_(loaded.narrow(0, rank * size, size))


class RowParallelLinear(LinearBase):
    """y = x A^T with A split by columns (input features); results all-reduced."""

    def __init__(self, input_size: int, output_size: int, tp: ParallelGroup, bias: bool = False):
        local = _divide(input_size, tp.size, "input size")
        super().__init__(local, output_size, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.data.dim() == 1:  # bias: added once, on rank 0 only
            param.data.copy_(loaded if self.tp_rank == 0 else torch.zeros_like(loaded))
            return
        size = param.data.size(1)
        param.data.copy_(loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(linear(x, self.weight, self.bias))
