"""The prefill side of the transfer tests, as its own process: for each request,
Reserve on the decode rank's pd-comm, write the request's blocks layer by layer, then
Commit (or cancel and Abort, or die). Prints one JSON line per request.

    python tests/cache_transfer/kv_sender.py ADDR --protocol tcp --requests 32 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cache_transfer.endpoints import endpoint_from_proto
from cache_transfer.ipc import IpcTransferEngine
from cache_transfer.pd_comm import PdCommClient
from cache_transfer.regions import block_runs, layer_regions
from cache_transfer.tcp import TcpTransferEngine
from cache_transfer.transfer_engine import TransferError, wait_all
from proto import cluster_pb2 as cluster_pb
from proto import pd_comm_pb2 as pb
from tests.cache_transfer.kv_cluster import (
    BLOCK_SIZE,
    DECODE_BLOCKS,
    PREFILL_BLOCKS,
    fingerprint,
    layout,
    prefill_pool,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--protocol", default="tcp")
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["commit", "cancel", "die"], default="commit")
    parser.add_argument("--fingerprint-head-dim", type=int, default=0)
    args = parser.parse_args()
    src_layout, dst_layout = layout(PREFILL_BLOCKS), layout(DECODE_BLOCKS)
    pool = prefill_pool(args.seed)
    engine = (
        IpcTransferEngine(pool, src_layout)
        if args.protocol == "ipc"
        else TcpTransferEngine(pool, src_layout, listen=False)
    )
    client = PdCommClient(args.address)
    rng = random.Random(args.seed)
    plans = []
    for i in range(args.requests):
        num_tokens = rng.randint(1, 12 * BLOCK_SIZE)
        num_blocks = -(-num_tokens // BLOCK_SIZE)
        plans.append((f"req{i}", num_tokens, rng.sample(range(PREFILL_BLOCKS), num_blocks)))
    changes = {"head_dim": args.fingerprint_head_dim} if args.fingerprint_head_dim else {}

    def run(plan: tuple[str, int, list[int]]) -> dict:
        request_id, num_tokens, src_blocks = plan
        reply = client.reserve(pb.ReserveRequest(
            request_id=request_id, num_tokens=num_tokens, protocol=args.protocol,
            fingerprint=fingerprint(src_layout, **changes), prefill_rank_id="p0",
        ))  # fmt: skip
        result = {"request_id": request_id, "status": pb.ReserveReply.Status.Name(reply.status),
                  "message": reply.message, "src_blocks": src_blocks,
                  "dst_blocks": list(reply.block_ids)}  # fmt: skip
        if reply.status != pb.ReserveReply.OK:
            return result
        if args.mode == "die":
            os._exit(3)  # a prefill rank that dies between Reserve and Commit
        engine.connect("d0", endpoint_from_proto(reply.endpoint))
        runs = block_runs(src_blocks, list(reply.block_ids))
        handles = [
            engine.write(
                "d0", reply.transfer_id, layer_regions(src_layout, dst_layout, runs, layer)
            )
            for layer in range(src_layout.num_layers)
        ]
        if args.mode == "cancel":
            for handle in handles:
                handle.cancel()
            result["released"] = client.abort(request_id)
            return result
        try:
            wait_all(handles, timeout_s=30)
        except TransferError as e:
            result["error"] = str(e)
            return result
        commit = client.commit(pb.CommitRequest(
            request_id=request_id, transfer_id=reply.transfer_id, first_token_id=7,
            num_computed_tokens=num_tokens,
            request=cluster_pb.DispatchedRequest(
                request_id=request_id, prompt_token_ids=[1] * num_tokens
            ),
        ))  # fmt: skip
        result |= {"committed": commit.ok, "commit_message": commit.message}
        return result

    with ThreadPoolExecutor(max_workers=min(args.requests, 32)) as pool_:
        for result in pool_.map(run, plans):
            print(json.dumps(result), flush=True)
    engine.close()
    client.close()


if __name__ == "__main__":
    main()
    # NOTE: skip interpreter teardown: once in a while grpc's C++ threads abort it
    # ("terminate called without an active exception") after all work is done.
    sys.stdout.flush()
    os._exit(0)
