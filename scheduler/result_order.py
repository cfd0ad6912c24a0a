"""Put one API server's result entries back in token order.

``ResultEntry.index`` is the position of the entry's first token, so the first token
(written by a prefill rank) and the rest (written by a decode rank) are put back in
order even when the two writes race. Entries of requests not expected (finished,
aborted, never ours) and duplicates are discarded; an error ends a request whatever
came before it. Not thread-safe: its owner serialises calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proto import cluster_pb2 as pb


@dataclass
class _Expected:
    next_index: int = 0
    early: dict[int, pb.ResultEntry] = field(default_factory=dict)  # index -> entry


class ResultOrder:
    def __init__(self) -> None:
        self._expected: dict[str, _Expected] = {}
        self.num_discarded = 0

    def expect(self, request_id: str) -> None:
        self._expected[request_id] = _Expected()

    def forget(self, request_id: str) -> None:
        self._expected.pop(request_id, None)

    def is_expected(self, request_id: str) -> bool:
        return request_id in self._expected

    def __len__(self) -> int:
        return len(self._expected)

    def accept(self, entry: pb.ResultEntry) -> list[pb.ResultEntry]:
        """The entries of ``entry``'s request that are now deliverable, in order."""
        expected = self._expected.get(entry.request_id)
        if expected is None:
            self.num_discarded += 1
            return []
        if entry.finish_reason == "error":  # the request is over whatever came before
            del self._expected[entry.request_id]
            return [entry]
        if entry.index < expected.next_index:
            self.num_discarded += 1  # a duplicate
            return []
        expected.early[entry.index] = entry
        ready = []
        while expected.next_index in expected.early:
            entry = expected.early.pop(expected.next_index)
            ready.append(entry)
            expected.next_index += len(entry.token_ids)
            if entry.finish_reason:
                del self._expected[entry.request_id]
                break
        return ready
