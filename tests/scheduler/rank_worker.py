"""A rank process for the scheduler's fault tests: registers, takes requests from its
queue as fast as a fake engine of ``--capacity`` slots serves them, and answers each
with one finished ResultEntry. The scheduler parts are real; only the model is not.

    python tests/scheduler/rank_worker.py --port P --rank-id ID [--work-ms 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proto import cluster_pb2 as pb
from scheduler.config import SchedulerConfig
from scheduler.redis_link import SchedulerUnavailable
from scheduler.splitwise import SplitwiseRank


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic", default="t")
    parser.add_argument("--rank-id", required=True)
    parser.add_argument("--role", default="mixed")
    parser.add_argument("--expire-ms", type=int, default=500)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--work-ms", type=float, default=2.0)
    args = parser.parse_args()
    config = SchedulerConfig(
        name="splitwise", port=args.port, topic=args.topic, expire_period_ms=args.expire_ms
    )
    record = pb.InstanceRecord(
        rank_id=args.rank_id,
        role=args.role,
        host="host-a",
        protocols=["tcp"],
        kv_layout=pb.KvLayout(block_size=16, num_blocks=1000),
    )
    rank = SplitwiseRank(config, record).start()
    print("ready", flush=True)
    running: list[pb.DispatchedRequest] = []
    while True:
        try:
            running += rank.take(args.capacity - len(running), block_s=0.05)
            rank.update_load(
                num_running=len(running),
                num_waiting=0,
                num_queued_prompt_tokens=0,
                num_free_blocks=1000 - len(running),
            )
            if not running:
                continue
            time.sleep(args.work_ms / 1000)  # one "engine step" finishes one request
            done = running.pop(0)
            rank.add_result(
                done.owner,
                pb.ResultEntry(request_id=done.request_id, token_ids=[7], finish_reason="stop"),
            )
            rank.end_step([done.request_id])
        except SchedulerUnavailable:
            time.sleep(0.05)


if __name__ == "__main__":
    main()
