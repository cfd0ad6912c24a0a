"""cuda_copy's ways of moving regions (one copy per large region; on one device the
block-unit kernel, or index_select/index_copy without Triton; across devices gather ->
copy -> scatter) land exactly the regions. The kernel reading a peer GPU's pool through
a CUDA IPC mapping runs in test_ipc_gpu.py (it needs two processes)."""

from __future__ import annotations

import pytest
import torch

from cache_transfer import cuda_copy
from cache_transfer.pool_bytes import flat_bytes
from cache_transfer.regions import all_regions
from tests.cache_transfer.kv_cluster import layout

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("way", "across"), [("direct", False), ("direct", True),
                         ("kernel", False), ("indexed", False), ("pipeline", True)])  # fmt: skip
def test_copy_regions_moves_exactly_the_regions(way: str, across: bool, monkeypatch) -> None:
    if across and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    if way == "kernel" and cuda_copy.triton is None:
        pytest.skip("needs Triton")
    if way == "direct":
        monkeypatch.setattr(cuda_copy, "DIRECT_COPY_MIN_BYTES", 1)
    if way == "indexed":
        monkeypatch.setattr(cuda_copy, "triton", None)
    if way == "pipeline":
        monkeypatch.setattr(cuda_copy, "PIPELINE_CHUNK_BYTES", 4096)  # several chunks
    src_device, dst_device = "cuda:0", "cuda:1" if across else "cuda:0"
    src_layout, dst_layout = layout(40), layout(64)
    src = torch.randn(src_layout.shape, device=src_device).to(torch.bfloat16)
    src_blocks, dst_blocks = [*range(0, 40, 2), 21, 22, 23], list(range(40, 63))
    regions = all_regions(src_layout, dst_layout, src_blocks, dst_blocks)
    dst = torch.zeros(dst_layout.shape, dtype=torch.bfloat16, device=dst_device)
    landing = torch.cuda.Stream(dst_device) if across else None
    cuda_copy.copy_regions(flat_bytes(src), flat_bytes(dst), regions, src_layout.block_bytes,
                           landing)  # fmt: skip
    torch.cuda.synchronize(src_device)
    torch.cuda.synchronize(dst_device)
    expected = torch.zeros_like(dst)
    expected[:, :, dst_blocks] = src[:, :, src_blocks].to(dst_device)
    assert torch.equal(dst, expected)
