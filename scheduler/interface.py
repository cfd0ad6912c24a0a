"""What an engine rank's loop talks to, whichever scheduler the instance runs.

``local`` (one instance, no Redis) and ``splitwise`` (Redis) both implement it; the
loop never knows which. Request and result types are the scheduler's: ``local``
carries the instance's own records, ``splitwise`` the protobuf records of proto/.

    loop:  requests = take(capacity)      # only as many as the rank can schedule now
           aborted  = take_aborts()       # of requests it has taken
           ...one engine step...
           add_result(owner, entry) per output; end_step(finished ids)
           update_load(...)               # cheap: no I/O on the loop
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol, TypeVar

Request = TypeVar("Request", covariant=True)
Result = TypeVar("Result", contravariant=True)


class RankScheduler(Protocol[Request, Result]):
    def take(self, max_n: int, block_s: float = 0.0) -> list[Request]:
        """Up to ``max_n`` requests, oldest first; from now on the rank answers for them."""

    def take_aborts(self) -> list[str]:
        """Ids of taken requests whose owners gave up since the last call."""

    def add_result(self, owner: Hashable, entry: Result) -> None:
        """Queue one output for the request's owner (sent by ``end_step``)."""

    def end_step(self, finished_request_ids: list[str]) -> None:
        """Send the step's results; the finished requests are released."""

    def update_load(
        self,
        *,
        num_running: int,
        num_waiting: int,
        num_queued_prompt_tokens: int,
        num_free_blocks: int,
    ) -> None:
        """The rank's load as dispatchers should see it."""

    def close(self) -> None: ...
