"""The layers on CUDA at Llama-3.1-8B sizes: ``forward`` (which runs the fused Triton
kernels) against ``forward_torch`` (the torch formulas) on the same GPU. Bit for bit for
the residual add, rotary and silu_and_mul, in float32 and bf16; RMSNorm within 4 ulps
(its mean sums in another order), 99% bit-equal in bf16. The kernels also replay in a
CUDA graph."""

from __future__ import annotations

import pytest
import torch

from engine.config import RopeConfig
from engine.layers.activation import SiluAndMul
from engine.layers.layernorm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from tests.engine.test_fused_ops import assert_nearly_equal

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

HIDDEN_SIZE = 4096
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
INTERMEDIATE_SIZE = 14336
MAX_POSITION = 131072
LLAMA_3_1_ROPE = RopeConfig(
    theta=500000.0,
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
DTYPES = [torch.float32, torch.bfloat16]
NUM_TOKENS = [1, 37, 16384]


def make_norm(size: int, dtype: torch.dtype) -> RMSNorm:
    norm = RMSNorm(size, eps=1e-5).cuda()
    norm.weight.data = (1 + 0.1 * torch.randn(size, device="cuda")).to(dtype)
    return norm


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k and v [T, Hk, D]: strided views of the fused projection's output."""
    q, k, v = qkv.split([NUM_HEADS * HEAD_DIM, *[NUM_KV_HEADS * HEAD_DIM] * 2], dim=-1)
    shape = (qkv.size(0), -1, HEAD_DIM)
    return q.view(shape), k.view(shape), v.view(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm(dtype: torch.dtype, num_tokens: int) -> None:
    torch.manual_seed(0)
    norm = make_norm(HIDDEN_SIZE, dtype)
    x = (3 * torch.randn(num_tokens, HIDDEN_SIZE, device="cuda")).to(dtype)
    assert_nearly_equal(norm(x), norm.forward_torch(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm_with_residual(dtype: torch.dtype, num_tokens: int) -> None:
    torch.manual_seed(0)
    norm = make_norm(HIDDEN_SIZE, dtype)
    x = torch.randn(num_tokens, HIDDEN_SIZE, device="cuda").to(dtype)
    residual = (4 * torch.randn(num_tokens, HIDDEN_SIZE, device="cuda")).to(dtype)
    expected_residual = x + residual
    expected = norm.forward_torch(expected_residual)
    out, new_residual = norm.forward_with_residual(x, residual)
    assert torch.equal(new_residual, expected_residual)
    assert_nearly_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_rms_norm_of_strided_q(dtype: torch.dtype) -> None:
    """Qwen3's q_norm over q split from the fused qkv output."""
    torch.manual_seed(0)
    norm = make_norm(HEAD_DIM, dtype)
    qkv = torch.randn(37, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, device="cuda").to(dtype)
    q, _, _ = split_qkv(qkv)
    assert_nearly_equal(norm(q), norm.forward_torch(q))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rotary_embedding(dtype: torch.dtype, num_tokens: int) -> None:
    torch.manual_seed(0)
    rope = RotaryEmbedding(HEAD_DIM, MAX_POSITION, LLAMA_3_1_ROPE).cuda()
    qkv_size = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    qkv = torch.randn(num_tokens, qkv_size, device="cuda").to(dtype)
    q, k, v = split_qkv(qkv)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device="cuda")
    positions[0] = MAX_POSITION - 1
    expected_q, expected_k = rope.forward_torch(positions, q, k)
    expected_v = v.clone()

    rotated_q, rotated_k = rope(positions, q, k)

    assert rotated_q.data_ptr() == q.data_ptr() and rotated_k.data_ptr() == k.data_ptr()
    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(v, expected_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul(dtype: torch.dtype, num_tokens: int) -> None:
    torch.manual_seed(0)
    act = SiluAndMul()
    x = (4 * torch.randn(num_tokens, 2 * INTERMEDIATE_SIZE, device="cuda")).to(dtype)
    assert torch.equal(act(x), act.forward_torch(x))


def test_kernels_replay_in_a_cuda_graph() -> None:
    """No host sync and no data-dependent buffers: a captured step recomputes new inputs."""
    torch.manual_seed(0)
    dtype, num_tokens = torch.bfloat16, 8
    norm = make_norm(HIDDEN_SIZE, dtype)
    rope = RotaryEmbedding(HEAD_DIM, MAX_POSITION, LLAMA_3_1_ROPE).cuda()
    act = SiluAndMul()
    hidden = torch.empty(num_tokens, HIDDEN_SIZE, device="cuda", dtype=dtype)
    residual = torch.empty_like(hidden)
    qkv_size = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    qkv = torch.empty(num_tokens, qkv_size, device="cuda", dtype=dtype)
    gate_up = torch.empty(num_tokens, 2 * INTERMEDIATE_SIZE, device="cuda", dtype=dtype)
    positions = torch.empty(num_tokens, dtype=torch.int64, device="cuda")

    def fill_inputs() -> None:
        for buffer in (hidden, residual, qkv, gate_up):
            buffer.copy_(torch.randn(buffer.shape, device="cuda"))
        positions.copy_(torch.randint(0, MAX_POSITION, (num_tokens,), device="cuda"))

    def step() -> list[torch.Tensor]:
        out, new_residual = norm.forward_with_residual(hidden.clone(), residual.clone())
        rotated = qkv.clone()
        q, k, _ = split_qkv(rotated)
        rope(positions, q, k)
        return [norm(hidden), out, new_residual, rotated, act(gate_up)]

    fill_inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    fill_inputs()
    graph.replay()
    expected = step()
    for replayed, eager in zip(captured, expected, strict=True):
        assert torch.equal(replayed, eager)
