"""CUDA ipc between two processes: the decode pool on the last GPU pulls from the
prefill pool on the first (GPU0 -> GPU1 over NVLink where there are two), bit-exact,
per layer; writes outside the transfer's blocks are refused by the receiver. Also when
the decode process sees only its own GPU (CUDA_VISIBLE_DEVICES), as launchers that
give each rank one GPU do."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch

from cache_transfer.endpoints import endpoint_from_proto, endpoint_to_proto
from cache_transfer.ipc import IpcTransferEngine
from cache_transfer.regions import Region, block_runs, dst_block_ranges, layer_regions
from cache_transfer.transfer_engine import TransferError, wait_all
from proto import pd_comm_pb2 as pb
from tests.cache_transfer.kv_cluster import layout

pytestmark = pytest.mark.gpu
SRC_BLOCKS = [5, 6, 7, 30, 2, 9, 10, 11, 12, 40]
DST_BLOCKS = [100, 101, 102, 103, 7, 8, 50, 51, 52, 0]
TRANSFER = bytes(range(16))


def source(device: str) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(11)
    return torch.randn(layout(64).shape, generator=generator, device=device).to(torch.bfloat16)


def decode_process(conn, device: str) -> None:  # type: ignore[no-untyped-def]
    dst_layout = layout(128)
    pool = torch.zeros(dst_layout.shape, dtype=dst_layout.dtype, device=device)
    engine = IpcTransferEngine(pool, dst_layout)
    engine.allow(TRANSFER, dst_block_ranges(dst_layout, DST_BLOCKS))
    conn.send(endpoint_to_proto(engine.endpoint()).SerializeToString())
    conn.recv()  # the writes are done
    engine.revoke(TRANSFER)
    expected = source(device)[:, :, SRC_BLOCKS]
    untouched = sorted(set(range(128)) - set(DST_BLOCKS))
    conn.send((bool(torch.equal(pool[:, :, DST_BLOCKS], expected)),
               bool(pool[:, :, untouched].any())))  # fmt: skip
    conn.recv()
    engine.close()


@pytest.mark.parametrize("decode_sees", ["all GPUs", "its GPU only"])
def test_cuda_ipc_write_lands_bit_exact_in_another_process(decode_sees: str) -> None:
    last = torch.cuda.device_count() - 1
    src_device, dst_device = "cuda:0", f"cuda:{last}"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if decode_sees == "its GPU only":  # the child inherits this at start
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[last] if visible else str(last)
        dst_device = "cuda:0"
    proc = ctx.Process(target=decode_process, args=(child, dst_device))
    try:
        proc.start()
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        endpoint = endpoint_from_proto(pb.Endpoint.FromString(parent.recv()))
        src_layout, dst_layout = layout(64), layout(128)
        engine = IpcTransferEngine(source(src_device), src_layout)
        engine.connect("d0", endpoint)
        runs = block_runs(SRC_BLOCKS, DST_BLOCKS)
        handles = [
            engine.write("d0", TRANSFER, layer_regions(src_layout, dst_layout, runs, layer))
            for layer in range(src_layout.num_layers)
        ]
        wait_all(handles, timeout_s=30)
        outside = Region(0, 1 * dst_layout.block_bytes, dst_layout.block_bytes)  # dst block 1
        with pytest.raises(TransferError, match=f"outside transfer {TRANSFER.hex()[:8]}'s blocks"):
            engine.write("d0", TRANSFER, [outside]).wait(30)
        with pytest.raises(TransferError, match="transfer 32323232 is not open"):  # b"2" * 16
            engine.write("d0", b"2" * 16, [Region(0, 0, dst_layout.block_bytes)]).wait(30)
        parent.send("done")
        landed, leaked = parent.recv()
        assert landed, "blocks differ after the CUDA ipc write"
        assert not leaked, "bytes landed outside the destination blocks"
        with pytest.raises(TransferError, match="is not open"):  # revoked after the check
            engine.write("d0", TRANSFER, layer_regions(src_layout, dst_layout, runs, 0)).wait(30)
        parent.send("close")
        engine.close()
    finally:
        proc.join(timeout=30)
