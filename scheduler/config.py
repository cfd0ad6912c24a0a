"""Where the cluster scheduler's Redis is and how long its records live."""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEDULER_NAMES = ("local", "splitwise")
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")


def check_id(kind: str, value: str) -> str:
    """Topics and rank/API ids become parts of Redis keys and SCAN patterns: keep them plain."""
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return value


@dataclass(frozen=True)
class SchedulerConfig:
    """``--scheduler-*`` flags. The defaults are FastDeploy's."""

    name: str = "local"  # local | splitwise
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = None
    topic: str = "default"
    ttl_s: float = 900.0  # longest a queued request or an unread result may live
    expire_period_ms: int = 3000  # registry TTL: a rank silent this long is gone

    def __post_init__(self) -> None:
        if self.name not in SCHEDULER_NAMES:
            raise ValueError(f"scheduler name must be one of {SCHEDULER_NAMES}, not {self.name!r}")
        check_id("scheduler topic", self.topic)
        if not 0 < self.port < 65536:
            raise ValueError(f"scheduler port must be in 1..65535, not {self.port}")
        if self.db < 0:
            raise ValueError(f"scheduler db must be >= 0, not {self.db}")
        if self.ttl_s <= 0:
            raise ValueError(f"scheduler ttl must be > 0 seconds, not {self.ttl_s}")
        if self.expire_period_ms < 100:
            raise ValueError(
                f"scheduler expire period must be >= 100 ms, not {self.expire_period_ms}"
            )

    @property
    def expire_period_s(self) -> float:
        return self.expire_period_ms / 1000

    @property
    def heartbeat_interval_s(self) -> float:
        """Records are rewritten four times per expire period: one lost write is harmless."""
        return self.expire_period_s / 4
