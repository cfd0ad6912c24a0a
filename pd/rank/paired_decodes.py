"""Where a prefill rank of a router-paired cluster looks up decode ranks: the records
the router sent with its requests (there is no Redis registry to read).

It answers the two questions ``PrefillHandoff`` asks a ``RegistryReader``: the record
of a rank by id, and a snapshot of others to retry on, which is empty: the router
paired the request with one decode rank, so a refusal ends in the bounded wait on that
rank and then a clear error, never a rank the router did not choose.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from proto import cluster_pb2 as pb

MAX_RECORDS = 4096  # decode ranks remembered (the newest record of each)


class PairedDecodes:
    """Learnt on the engine loop, read by the hand-off's worker threads."""

    def __init__(self) -> None:
        self._records: OrderedDict[str, pb.InstanceRecord] = OrderedDict()
        self._lock = threading.Lock()

    def learn(self, record: pb.InstanceRecord) -> None:
        """The newest record of a decode rank (a restarted one may have moved ports)."""
        with self._lock:
            self._records[record.rank_id] = record
            self._records.move_to_end(record.rank_id)
            while len(self._records) > MAX_RECORDS:
                self._records.popitem(last=False)

    def record(self, rank_id: str) -> pb.InstanceRecord | None:
        with self._lock:
            return self._records.get(rank_id)

    def snapshot(self, max_age_s: float | None = None) -> list:
        return []

    def close(self) -> None:
        pass
