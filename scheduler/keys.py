"""The Redis keys of one topic (``--scheduler-topic``); DESIGN.md "The splitwise request path".

T:inst:<role>:<rank id>  InstanceRecord, PX = expire period (the registry)
T:req:<rank id>          DispatchedRequest list, queued (LPUSH in, oldest on the right)
T:proc:<rank id>         DispatchedRequest list, taken by the rank and not yet finished
T:res:<api id>           ResultBatch list for one API server, EXPIRE = ttl
T:ctl:<rank id>          ControlMessage list (aborts) for one rank
T:reaper                 lock of the instance settling dead ranks' requests

The braces are a Redis Cluster hash tag: a rank's queue and processing list live in one
slot, so ``take`` (one script over both) also runs on a cluster. NOTE: the reaper's
scripts (dead queue -> live queue, processing list -> owner's results) still span two
slots; they need a single Redis or Sentinel until they are split into idempotent steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.config import check_id


@dataclass(frozen=True)
class Keys:
    topic: str

    def __post_init__(self) -> None:
        check_id("scheduler topic", self.topic)

    def instance(self, role: str, rank_id: str) -> str:
        return f"{self.topic}:inst:{role}:{check_id('rank id', rank_id)}"

    @property
    def instance_pattern(self) -> str:
        return f"{self.topic}:inst:*"

    def queue(self, rank_id: str) -> str:
        return f"{self.topic}:req:{{{check_id('rank id', rank_id)}}}"

    def processing(self, rank_id: str) -> str:
        return f"{self.topic}:proc:{{{check_id('rank id', rank_id)}}}"

    def results(self, api_id: str) -> str:
        return f"{self.topic}:res:{check_id('api id', api_id)}"

    def control(self, rank_id: str) -> str:
        return f"{self.topic}:ctl:{check_id('rank id', rank_id)}"

    @property
    def reaper_lock(self) -> str:
        return f"{self.topic}:reaper"

    def rank_keys_pattern(self, kind: str) -> str:
        """SCAN pattern of every rank's ``req`` or ``proc`` list."""
        return f"{self.topic}:{kind}:*"

    def rank_of(self, key: str) -> str:
        """The rank id at the end of a ``req``/``proc``/``ctl`` key."""
        return key.rsplit(":", 1)[1].strip("{}")
