"""The decode side of the transfer tests, as its own process (for the network-namespace
test): serves pd-comm + tcp on ``--host``, prints its pd-comm address, then reads the
sender's JSON result lines on stdin and prints "verified N" once every committed
request's blocks equal the prefill pool's (or the first mismatch).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from tests.cache_transfer.kv_cluster import DecodeSide, prefill_pool


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    side = DecodeSide("tcp", host=args.host)
    print(side.address, flush=True)
    source = prefill_pool(args.seed)
    verified = 0
    for line in sys.stdin:
        result = json.loads(line)
        _, block_ids = side.committed[result["request_id"]]
        if not torch.equal(side.pool[:, :, block_ids], source[:, :, result["src_blocks"]]):
            print(f"mismatch in {result['request_id']}", flush=True)
            return
        verified += 1
    print(f"verified {verified}", flush=True)
    side.close()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # as kv_sender.py: no interpreter teardown after grpc
