"""The router's Prometheus metrics, per instance (``instance``: its URL), in a registry
of their own. With --splitwise a request counts on its prefill instance (forwarded to
it) and on its decode instance (paired with it), with the same outcome."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

OUTCOMES = ("ok", "error_status", "unreachable", "broken", "aborted")


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["instance", "role"]
        self.requests = Counter(
            "pd:router_requests", "Requests forwarded to an instance (a decode instance: "
            "paired with it), by how they ended: ok, error_status (the instance answered "
            "4xx/5xx), unreachable (never reached it), broken (it failed while answering), "
            "aborted (the client left first)",
            [*labels, "outcome"], registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge("pd:router_in_flight", "Requests open on an instance",
                               labels, registry=self.registry)  # fmt: skip
        self.load = Gauge("pd:router_instance_load", "An instance's load as the policies "
                          "see it", labels, registry=self.registry)  # fmt: skip
        self.up = Gauge("pd:router_instance_up", "1 while an instance is picked, else 0",
                        labels, registry=self.registry)  # fmt: skip
        self.unserved = Counter(
            "pd:router_unserved_requests", "Requests answered by the router itself with an "
            "error (no instance up for the model, or none reachable)", ["reason"],
            registry=self.registry,
        )  # fmt: skip

    def observe(self, url: str, role: str, outcome: str) -> None:
        self.requests.labels(url, role, outcome).inc()

    def set_instance(self, url: str, role: str, is_up: bool, load: int, in_flight: int) -> None:
        self.up.labels(url, role).set(1 if is_up else 0)
        self.load.labels(url, role).set(load)
        self.in_flight.labels(url, role).set(in_flight)

    def forget(self, url: str, role: str) -> None:
        for gauge in (self.up, self.load, self.in_flight):
            gauge.remove(url, role)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
