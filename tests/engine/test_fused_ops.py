"""The fused kernels against the layers' torch formulas (``forward_torch``), in Triton's
interpreter on CPU (on CUDA where there is a GPU). Small sizes: the interpreter is slow.

Bit for bit: the residual add, rotary. Within an ulp or two: RMSNorm (its mean sums in
another order) and silu_and_mul here (numpy's exp in the interpreter is not torch's; on
CUDA both are expf and test_fused_ops_gpu.py checks the bits).
"""

from __future__ import annotations

import pytest
import torch

from engine.config import RopeConfig
from engine.layers.activation import SiluAndMul
from engine.layers.layernorm import RMSNorm
from engine.layers.rotary import RotaryEmbedding

fused_ops = pytest.importorskip("engine.kernels.fused_ops")
pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.bfloat16]


def assert_nearly_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 4 ulps; in bf16 also 99% bit-equal: float32 differences of an ulp or two
    seldom cross a bf16 rounding point, a misplaced rounding would."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    eps = torch.finfo(expected.dtype).eps
    torch.testing.assert_close(actual, expected, rtol=4 * eps, atol=0)
    if expected.dtype == torch.bfloat16:
        assert (actual == expected).float().mean().item() >= 0.99


def make_norm(size: int, dtype: torch.dtype, device: str) -> RMSNorm:
    norm = RMSNorm(size, eps=1e-5).to(device)
    norm.weight.data = (1 + 0.1 * torch.randn(size, device=device)).to(dtype)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [576, 1536])
def test_rms_norm_matches_torch(device: str, dtype: torch.dtype, size: int) -> None:
    torch.manual_seed(0)
    norm = make_norm(size, dtype, device)
    x = (3 * torch.randn(7, size, device=device)).to(dtype)
    assert_nearly_equal(fused_ops.rms_norm(x, norm.weight, norm.eps), norm.forward_torch(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reads_per_head_views(device: str, dtype: torch.dtype) -> None:
    """Qwen3's q/k norm: q [T, H, D] is a strided view of the fused qkv output."""
    torch.manual_seed(0)
    num_heads, head_dim = 3, 64
    norm = make_norm(head_dim, dtype, device)
    qkv = torch.randn(5, (num_heads + 2) * head_dim, device=device).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(5, num_heads, head_dim)
    out = fused_ops.rms_norm(q, norm.weight, norm.eps)
    assert out.is_contiguous()
    assert_nearly_equal(out, norm.forward_torch(q))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [576, 1536])
def test_fused_add_rms_norm_matches_torch_in_place(
    device: str, dtype: torch.dtype, size: int
) -> None:
    torch.manual_seed(0)
    norm = make_norm(size, dtype, device)
    x = torch.randn(7, size, device=device).to(dtype)
    residual = (4 * torch.randn(7, size, device=device)).to(dtype)
    expected_residual = x + residual
    expected = norm.forward_torch(expected_residual)
    out, new_residual = fused_ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    assert out.data_ptr() == x.data_ptr() and new_residual.data_ptr() == residual.data_ptr()
    assert torch.equal(new_residual, expected_residual)
    assert_nearly_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim"),
    [(5, 1, 64), (4, 2, 96), (40, 8, 128)],  # 40 heads: two head tiles of 32
)
def test_rotary_embedding_matches_torch_in_place(
    device: str, dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    torch.manual_seed(0)
    max_position = 300
    rope = RotaryEmbedding(head_dim, max_position, RopeConfig(theta=500000.0)).to(device)
    num_tokens = 5
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device=device).to(dtype)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, num_q_heads, head_dim)  # strided: rows of the fused output
    k = k.view(num_tokens, num_kv_heads, head_dim)
    positions = torch.tensor([0, 17, max_position - 1, 3, 17], device=device)
    expected_q, expected_k = rope.forward_torch(positions, q, k)
    expected_v = v.clone()

    fused_ops.rotary_embedding_(positions, q, k, rope.cos_cache, rope.sin_cache)

    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(v, expected_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 2 * 576), (2, 3, 2 * 1536)])
def test_silu_and_mul_matches_torch(device: str, dtype: torch.dtype, shape: tuple) -> None:
    torch.manual_seed(0)
    x = (4 * torch.randn(shape, device=device)).to(dtype)
    assert_nearly_equal(fused_ops.silu_and_mul(x), SiluAndMul().forward_torch(x))


def test_in_place_kernels_reject_what_they_cannot_write(device: str) -> None:
    weight = torch.ones(64, device=device)
    x = torch.randn(4, 64, device=device)
    transposed = torch.randn(64, 4, device=device).T
    with pytest.raises(ValueError, match="contiguous last dim"):
        fused_ops.fused_add_rms_norm(x, transposed, weight, 1e-6)
    with pytest.raises(ValueError, match="one dtype"):
        fused_ops.fused_add_rms_norm(x, x.double(), weight, 1e-6)
