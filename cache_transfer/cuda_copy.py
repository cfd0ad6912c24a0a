"""Moving byte regions between two KV pools on CUDA devices (one process's view).

Three ways, by what the regions look like (measured between two H200s over NVLink,
2026-11-22, against a raw 1 GiB peer copy at 392 GB/s):
- large regions (long contiguous runs of blocks): one copy-engine copy each (~95% for
  128 MiB regions; 71% at 16 MiB, where the kernel does 80%);
- many small regions (scattered blocks): one Triton kernel moving every block unit,
  launched on the source device, loading locally and storing over the peer link (80%
  of the raw rate on 512 MiB of 128 KiB blocks, 66% for 32 KiB blocks; one launch
  whatever the count); a copy launch per region is CPU-bound (158 and 59 GB/s, even
  through cudaMemcpyBatchAsync);
- without Triton or peer access: gather -> bulk copy -> scatter in chunks (60% and
  49% on the same bytes).
Every region is a whole number of ``unit``-byte blocks at unit-aligned offsets
(regions.py guarantees it). Copies are queued on the devices' current streams.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from cache_transfer.regions import Region, Regions

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; the pipeline below still works
    triton = None

DIRECT_COPY_MIN_BYTES = 32 << 20  # smaller regions: the kernel beats a copy launch each
PIPELINE_CHUNK_BYTES = 64 << 20
KERNEL_BLOCK_WORDS = 2048  # 16 KiB per program, 8 warps: the best of the sizes tried


def copy_regions(
    src: torch.Tensor,
    dst: torch.Tensor,
    regions: Sequence[Region],
    unit: int,
    landing: torch.cuda.Stream | None = None,
) -> None:
    """Copy byte ``regions`` of flat uint8 ``src`` into flat uint8 ``dst``. Across
    devices, peer access must be enabled (``enable_peer_access``) for the kernel path,
    and without it ``landing`` (a spare stream on dst's device) is required."""
    regions = Regions.of(regions)
    if not len(regions):
        return
    if regions.total_bytes // len(regions) >= DIRECT_COPY_MIN_BYTES:
        for r in regions:
            dst[r.dst_offset : r.dst_offset + r.nbytes].copy_(
                src[r.src_offset : r.src_offset + r.nbytes], non_blocking=True
            )
        return
    src_index, dst_index = unit_indices(regions, unit)
    if _kernel_can_copy(src, dst, unit):
        indices = _to(torch.stack([src_index, dst_index]), src.device)  # one upload
        _copy_units(src, dst, indices[0], indices[1], unit)
    elif src.device == dst.device:
        rows_src, rows_dst = _rows(src, unit), _rows(dst, unit)
        gathered = rows_src.index_select(0, _to(src_index, src.device))
        rows_dst.index_copy_(0, _to(dst_index, dst.device), gathered)
    else:
        _copy_pipelined(src, dst, src_index, dst_index, unit, landing)


def unit_indices(regions: Sequence[Region], unit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-unit indices of every region's source and destination, in order."""
    arrays = Regions.of(regions)
    table = np.stack([arrays.src_offset, arrays.dst_offset, arrays.nbytes], axis=1)
    if (table % unit).any():
        raise ValueError(f"regions are not whole numbers of {unit}-byte blocks")
    table = table // unit
    counts = table[:, 2]
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    src = np.repeat(table[:, 0], counts) + within
    dst = np.repeat(table[:, 1], counts) + within
    return torch.from_numpy(src), torch.from_numpy(dst)


def enable_peer_access(src: torch.device, dst: torch.device) -> bool:
    """Let kernels on ``src`` reach memory on ``dst``; False where the link cannot."""
    if src == dst:
        return True
    if not torch.cuda.can_device_access_peer(src.index, dst.index):
        return False
    # torch enables peer access src -> dst on the first copy between them (once).
    torch.empty(1, dtype=torch.uint8, device=dst).copy_(
        torch.empty(1, dtype=torch.uint8, device=src)
    )
    return True


def _kernel_can_copy(src: torch.Tensor, dst: torch.Tensor, unit: int) -> bool:
    if triton is None or not src.is_cuda or unit % 8:
        return False
    # The kernel runs on src's device and stores through dst's address: across devices
    # that needs peer access (enable_peer_access; the caller did it when it could).
    return src.device == dst.device or torch.cuda.can_device_access_peer(
        src.device.index, dst.device.index
    )


if triton is not None:

    @triton.jit
    def _copy_units_kernel(src_addr, dst_addr, src_index, dst_index,
                           WORDS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """Program (i, j) copies words [j*BLOCK, (j+1)*BLOCK) of unit i. Addresses come
        as integers: dst may live on another device, which a tensor argument of a
        kernel launched here may not."""
        row = tl.program_id(0)
        words = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        src = src_addr.to(tl.pointer_type(tl.int64)) + tl.load(src_index + row) * WORDS
        dst = dst_addr.to(tl.pointer_type(tl.int64)) + tl.load(dst_index + row) * WORDS
        tl.store(dst + words, tl.load(src + words))


def _copy_units(src: torch.Tensor, dst: torch.Tensor, src_index: torch.Tensor,
                dst_index: torch.Tensor, unit: int) -> None:  # fmt: skip
    words = unit // 8
    block = KERNEL_BLOCK_WORDS
    while words % block:  # a power of two dividing the unit: no masking needed
        block //= 2
    here = torch.cuda.current_device() == src.device.index  # a device switch costs ~10 us
    with contextlib.nullcontext() if here else torch.cuda.device(src.device):
        _copy_units_kernel[(len(src_index), words // block)](
            src.data_ptr(), dst.data_ptr(), src_index, dst_index,
            WORDS=words, BLOCK=block, num_warps=8 if block >= 1024 else 4,
        )  # fmt: skip


def _copy_pipelined(src: torch.Tensor, dst: torch.Tensor, src_index: torch.Tensor,
                    dst_index: torch.Tensor, unit: int,
                    landing: torch.cuda.Stream | None) -> None:  # fmt: skip
    """Gather on src -> one copy to dst's device -> scatter there, chunk by chunk, so
    chunk i crosses while chunk i-1 is scattered."""
    if landing is None:
        raise ValueError("a cross-device copy needs a landing stream on the destination")
    place = torch.cuda.current_stream(dst.device)  # where chunks move into the pool
    src_index, dst_index = _to(src_index, src.device), _to(dst_index, dst.device)
    rows_src, rows_dst = _rows(src, unit), _rows(dst, unit)
    rows_per_chunk = max(PIPELINE_CHUNK_BYTES // unit, 1)
    for first in range(0, len(src_index), rows_per_chunk):
        last = first + rows_per_chunk
        gathered = rows_src.index_select(0, src_index[first:last])
        # The copy runs on src's current stream and is ordered with dst's current
        # stream: make that the landing stream, so it never waits for earlier placing.
        with torch.cuda.stream(landing):
            moved = gathered.to(dst.device, non_blocking=True)
        place.wait_stream(landing)
        moved.record_stream(place)
        rows_dst.index_copy_(0, dst_index[first:last], moved)


def _rows(flat: torch.Tensor, unit: int) -> torch.Tensor:
    """``flat`` as [blocks of every layer and K|V, unit bytes], in 8-byte words when
    possible (wide rows gather and scatter faster)."""
    if unit % 8 == 0:
        return flat.view(torch.int64).view(-1, unit // 8)
    return flat.view(-1, unit)


def _to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)
