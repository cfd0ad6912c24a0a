"""Moving byte regions between two KV pools on CUDA devices (one process's view).

On the ipc path both pools are "on one device" here: the receiver's own pool, and the
sender's pool mapped into the receiver's device (a peer mapping, ipc_pull.py), so the
copies run on the receiver's GPU and pull over the link. Measured pulling GPU0 -> GPU1
between two H200s over NVLink (2026-11-22), against a plain 1 GiB peer copy at 390-395
GB/s, CPU costs included:
- large regions (long contiguous runs of blocks): one copy-engine copy each, 390 GB/s
  for 128 MiB regions, 323 at 8 MiB (where the kernel does 264), 293 at 4 MiB (kernel
  312); a copy launch per region is CPU-bound below that (137 GB/s at 1 MiB, 3 at
  32 KiB);
- many small regions (scattered blocks): one Triton kernel moving every block unit,
  the loads crossing the link, 128-bit accesses: 367-369 GB/s on its own on 512 MiB
  of 32 KiB or 128 KiB blocks (block size, warps, cache hints and several units per
  program all within 2%; TMA loads 354-366); building and uploading the unit indices
  from Python is the rest (~300 GB/s for 256 MiB);
- across devices (no peer mapping): gather -> bulk copy -> scatter in chunks.
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
except ImportError:  # CPU-only installs; index_select / index_copy_ still work
    triton = None

DIRECT_COPY_MIN_BYTES = 8 << 20  # smaller regions: one kernel beats a copy launch each
PIPELINE_CHUNK_BYTES = 64 << 20
KERNEL_BLOCK_WORDS = 2048  # 16 KiB per program, 8 warps (1-16 K words: all within 2%)


def copy_regions(
    src: torch.Tensor,
    dst: torch.Tensor,
    regions: Sequence[Region],
    unit: int,
    landing: torch.cuda.Stream | None = None,
) -> None:
    """Copy byte ``regions`` of flat uint8 ``src`` into flat uint8 ``dst``, queued on
    the current streams. ``src`` may be a peer GPU's memory mapped into ``dst``'s device
    (``open_shared_pool``): that is one device here, and the copies pull over the link.
    Across devices ``landing`` (a spare stream on dst's device) is required."""
    regions = Regions.of(regions)
    if not len(regions):
        return
    if regions.total_bytes // len(regions) >= DIRECT_COPY_MIN_BYTES:
        for r in regions:
            dst[r.dst_offset : r.dst_offset + r.nbytes].copy_(
                src[r.src_offset : r.src_offset + r.nbytes], non_blocking=True
            )
        return
    indices = unit_indices(regions, unit)
    if src.device != dst.device:
        _copy_pipelined(src, dst, indices[0], indices[1], unit, landing)
        return
    indices = _to(indices, src.device)  # one upload for both rows
    if triton is not None and src.is_cuda and unit % 8 == 0:
        _copy_units(src, dst, indices[0], indices[1], unit)
    else:
        rows_src, rows_dst = _rows(src, unit), _rows(dst, unit)
        rows_dst.index_copy_(0, indices[1], rows_src.index_select(0, indices[0]))


def unit_indices(regions: Sequence[Region], unit: int) -> torch.Tensor:
    """[2, units]: the block-unit indices of every region's source (row 0) and
    destination (row 1), in order."""
    arrays = Regions.of(regions)
    table = np.stack([arrays.src_offset, arrays.dst_offset, arrays.nbytes])
    units = table // unit  # (np.divmod is ten times slower)
    if (units * unit != table).any():
        raise ValueError(f"regions are not whole numbers of {unit}-byte blocks")
    counts = units[2]
    if (counts == 1).all():  # scattered single blocks: nothing to expand
        return torch.from_numpy(units[:2])
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return torch.from_numpy(np.repeat(units[:2], counts, axis=1) + within)


if triton is not None:

    @triton.jit
    def _copy_units_kernel(src, dst, src_index, dst_index,
                           WORDS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        """Program (i, j) copies words [j*BLOCK, (j+1)*BLOCK) of unit i. ``src`` and
        ``dst`` are 16-byte aligned int64 views and WORDS is even, so Triton can move
        128 bits per access."""
        row = tl.program_id(0)
        words = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        src_unit = src + tl.load(src_index + row) * WORDS
        dst_unit = dst + tl.load(dst_index + row) * WORDS
        tl.store(dst_unit + words, tl.load(src_unit + words))


def _copy_units(src: torch.Tensor, dst: torch.Tensor, src_index: torch.Tensor,
                dst_index: torch.Tensor, unit: int) -> None:  # fmt: skip
    words = unit // 8
    block = KERNEL_BLOCK_WORDS
    while words % block:  # a power of two dividing the unit: no masking needed
        block //= 2
    here = torch.cuda.current_device() == src.device.index  # a device switch costs ~10 us
    with contextlib.nullcontext() if here else torch.cuda.device(src.device):
        _copy_units_kernel[(len(src_index), words // block)](
            src.view(torch.int64), dst.view(torch.int64), src_index, dst_index,
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
