"""The instances the router knows: who they are, whether they serve now, their load.

An instance is *up* while its heartbeats are fresh (the last within ``timeout_s``), its
last health probe (or forwarded request) did not fail, and it has not said it is
stopping (draining). Only up instances are
picked. One silent for ``forget_after_s`` is forgotten; one that comes back (a
heartbeat, a good probe) is up again.

All times are this process's monotonic clock: nothing is compared across hosts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pd.router.wire import Registration


class RegistrationRefused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class InstanceRecord:
    registration: Registration
    last_heartbeat: float
    failure: str | None = None  # why the last probe or forward failed; None: it answered
    in_flight: int = 0  # requests the router has open on it

    @property
    def url(self) -> str:
        return self.registration.url

    @property
    def role(self) -> str:
        return self.registration.role

    @property
    def load(self) -> int:
        """Requests in flight: the router's own count is current, the instance's report
        (a heartbeat old) also counts requests that reach it around the router."""
        return max(self.in_flight, self.registration.num_open)


class Registry:
    def __init__(self, timeout_s: float = 5.0, forget_after_s: float = 60.0):
        self.timeout_s = timeout_s
        self.forget_after_s = forget_after_s
        self.records: dict[str, InstanceRecord] = {}  # by URL

    def register(self, registration: Registration, now: float | None = None) -> bool:
        """Record a registration or heartbeat; True when the instance is new (or was
        forgotten). RegistrationRefused when it serves a model name under another
        digest than an up instance does (another checkpoint under the same name)."""
        now = time.monotonic() if now is None else now
        for other in self.up(now):
            if other.url == registration.url:
                continue
            shared = set(other.registration.model_names) & set(registration.model_names)
            if shared and other.registration.model_digest != registration.model_digest:
                raise RegistrationRefused(
                    409,
                    f"{registration.url} serves {sorted(shared)[0]!r} from another model "
                    f"(digest {registration.model_digest}) than {other.url} (digest "
                    f"{other.registration.model_digest})",
                )
        record = self.records.get(registration.url)
        if record is None:
            self.records[registration.url] = InstanceRecord(registration, now)
            return True
        record.registration = registration
        record.last_heartbeat = now
        return False

    def is_up(self, record: InstanceRecord, now: float | None = None) -> bool:
        return self.down_reason(record, now) is None

    def down_reason(self, record: InstanceRecord, now: float | None = None) -> str | None:
        now = time.monotonic() if now is None else now
        if record.registration.is_draining:
            return "draining: it is stopping"
        if now - record.last_heartbeat > self.timeout_s:
            return f"no heartbeat for {now - record.last_heartbeat:.1f} s"
        return record.failure

    def up(self, now: float | None = None) -> list[InstanceRecord]:
        return [r for r in self.records.values() if self.is_up(r, now)]

    def serving(self, model: str, role: str, now: float | None = None) -> list[InstanceRecord]:
        """The up instances of ``role`` that serve ``model``."""
        return [
            r for r in self.up(now)
            if r.role == role and model in r.registration.model_names
        ]  # fmt: skip

    def model_names(self, now: float | None = None) -> list[str]:
        return sorted({name for r in self.up(now) for name in r.registration.model_names})

    def forget_silent(self, now: float | None = None) -> list[InstanceRecord]:
        """Forget the instances silent for forget_after_s; their records."""
        now = time.monotonic() if now is None else now
        gone = [r for r in self.records.values() if now - r.last_heartbeat > self.forget_after_s]
        for record in gone:
            del self.records[record.url]
        return gone
