"""The router's registry: up while heartbeats are fresh and probes pass, forgotten
when silent long enough, a model under two digests refused (no processes)."""

from __future__ import annotations

import pytest

from pd.router.registry import RegistrationRefused, Registry
from pd.router.wire import Registration


def registration(url: str, digest: str = "d1", num_open: int = 0, **fields) -> Registration:
    values = dict(role="mixed", url=url, model_names=["m"], dp_rank=0, model_digest=digest,
                  max_model_len=256, num_open=num_open, num_waiting=0)  # fmt: skip
    return Registration(**(values | fields))


def test_up_while_heartbeats_are_fresh_and_probes_pass():
    registry = Registry(timeout_s=5, forget_after_s=60)
    assert registry.register(registration("http://a:1"), now=0.0) is True
    assert registry.register(registration("http://a:1"), now=1.0) is False
    record = registry.records["http://a:1"]
    assert [r.url for r in registry.serving("m", "mixed", now=6.0)] == ["http://a:1"]
    assert registry.serving("other", "mixed", now=6.0) == []
    assert registry.serving("m", "mixed", now=6.1) == []  # silent for more than 5 s
    assert registry.down_reason(record, now=6.1) == "no heartbeat for 5.1 s"
    registry.register(registration("http://a:1"), now=7.0)  # back
    assert registry.is_up(record, now=7.0)
    record.failure = "/health failed: refused"
    assert not registry.is_up(record, now=7.0)
    assert registry.down_reason(record, now=7.0) == "/health failed: refused"


def test_silent_instances_are_forgotten():
    registry = Registry(timeout_s=5, forget_after_s=60)
    registry.register(registration("http://a:1"), now=0.0)
    registry.register(registration("http://b:1"), now=30.0)
    assert [record.url for record in registry.forget_silent(now=61.0)] == ["http://a:1"]
    assert list(registry.records) == ["http://b:1"]


def test_load_is_the_larger_of_the_routers_count_and_the_report():
    registry = Registry()
    registry.register(registration("http://a:1", num_open=3), now=0.0)
    record = registry.records["http://a:1"]
    assert record.load == 3
    record.in_flight = 7
    assert record.load == 7


def test_a_model_name_under_another_digest_is_refused_while_the_first_is_up():
    registry = Registry(timeout_s=5, forget_after_s=60)
    registry.register(registration("http://a:1", digest="d1"), now=0.0)
    with pytest.raises(RegistrationRefused, match="another model") as refused:
        registry.register(registration("http://b:1", digest="d2"), now=1.0)
    assert refused.value.status == 409
    registry.register(registration("http://b:1", digest="d2", model_names=["n"]), now=9.0)
    registry.register(registration("http://c:1", digest="d2"), now=10.0)  # a is down now
    assert registry.model_names(now=10.0) == ["m", "n"]


def test_malformed_registrations_are_refused():
    with pytest.raises(ValueError):
        registration("ftp://a:1")
    with pytest.raises(ValueError):
        registration("http://a:1", model_names=[])
    with pytest.raises(ValueError):
        registration("http://a:1", role="leader")
    with pytest.raises(ValueError):
        Registration.model_validate({**registration("http://a:1").model_dump(), "extra": 1})


def test_a_draining_instance_is_not_picked():
    registry = Registry(timeout_s=5, forget_after_s=60)
    registry.register(registration("http://a:1"), now=0.0)
    registry.register(registration("http://a:1", is_draining=True), now=1.0)
    record = registry.records["http://a:1"]
    assert registry.serving("m", "mixed", now=1.0) == []
    assert registry.down_reason(record, now=9.0) == "draining: it is stopping"
