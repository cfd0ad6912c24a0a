"""The one-row GEMV kernel against a float32 F.linear, in Triton's interpreter on CPU (on
CUDA where there is a GPU): ragged sizes (rows and K not multiples of the tiles), a
bias, and the dispatch rule that keeps float32 and multi-row inputs on torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

gemv_module = pytest.importorskip("engine.kernels.gemv")
pytestmark = pytest.mark.triton

SMALL = gemv_module.GemvConfig(block_n=4, block_k=16, num_warps=1, num_stages=1)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("size_in", "size_out"), [(64, 32), (40, 13), (16, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float32_linear(size_in: int, size_out: int, bias: bool):
    torch.manual_seed(0)
    weight = torch.randn(size_out, size_in, device=device()).to(torch.bfloat16)
    x = torch.randn(1, size_in, device=device()).to(torch.bfloat16)
    b = torch.randn(size_out, device=device()).to(torch.bfloat16) if bias else None
    got = gemv_module.gemv(x, weight, b, config=SMALL)
    reference = F.linear(x.float(), weight.float(), None if b is None else b.float())
    assert got.shape == (1, size_out) and got.dtype == torch.bfloat16
    # float32 sums in another order, rounded once to bf16: within a bf16 ulp or two
    torch.testing.assert_close(got.float(), reference, rtol=2**-7, atol=1e-2)


def test_gemv_refuses_what_it_cannot_run():
    weight = torch.zeros(8, 16, dtype=torch.bfloat16, device=device())
    with pytest.raises(ValueError, match="one row of 16 features"):
        gemv_module.gemv(torch.zeros(2, 16, dtype=torch.bfloat16, device=device()), weight)
    with pytest.raises(ValueError, match="rows contiguous"):
        gemv_module.gemv(torch.zeros(1, 8, dtype=torch.bfloat16, device=device()), weight.t())


def test_only_one_16_bit_row_on_cuda_takes_the_gemv():
    """engine.layers.linear.linear: the CPU, float32 and several rows stay on F.linear."""
    from engine.layers.linear import linear

    weight = torch.randn(8, 16, device=device())
    rows = torch.randn(2, 16, device=device())
    assert torch.equal(linear(rows, weight), F.linear(rows, weight))  # float32: torch
    one = rows[:1].to(torch.bfloat16)
    got = linear(one, weight.to(torch.bfloat16))
    expected = F.linear(one.float(), weight.float())
    torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=1e-2)
