"""Prometheus metrics of one API server, named as users scrape them from vLLM (``pd:``).

The metrics live in their own ``CollectorRegistry``, so that several servers in one
process (tests) never share or collide on series.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

FINISHED_REASONS = ("stop", "length", "abort", "error")

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
    20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


KV_BYTES_BUCKETS = tuple(float(1 << n) for n in range(10, 36, 2))  # 1 KiB .. 32 GiB
KV_SECONDS_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
KV_GBPS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 400.0)


class ServerMetrics:
    """The metrics of one served model; every series carries ``model_name``."""

    def __init__(
        self,
        model_name: str,
        registry: CollectorRegistry | None = None,
        dp_ranks: tuple[int, ...] = (0,),
    ):
        """``dp_ranks``: the DP ranks whose engines this API server reports."""
        self.model_name = model_name
        self.registry = CollectorRegistry() if registry is None else registry
        self._make_gauges()
        self._make_counters()
        self._make_histograms()
        self._make_kv_transfer_metrics()
        for dp_rank in dp_ranks:  # rendered from the start, before the first stats
            self.set_engine_stats(dp_rank, 0, 0, 0, 0)
            self._taken.labels(model_name, str(dp_rank))

    def _make_gauges(self) -> None:
        def per_rank(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["model_name", "dp_rank"], registry=self.registry)

        self._num_running = per_rank("pd:num_requests_running", "Requests in the running batch.")
        self._num_waiting = per_rank("pd:num_requests_waiting", "Requests waiting to be scheduled.")
        self._kv_usage = per_rank("pd:kv_cache_usage_perc", "Fraction of KV blocks in use (0..1).")
        self._num_free_blocks = per_rank("pd:num_gpu_blocks_free", "KV cache blocks free.")
        self._dp_rank_up = per_rank(
            "pd:dp_rank_up", "1 while the engine process of this DP rank is alive."
        )
        self._tp_worker_up = Gauge(
            "pd:tp_worker_up",
            "1 while the tensor-parallel worker of this rank is alive (KV use is the same "
            "on every TP rank: see pd:kv_cache_usage_perc).",
            ["model_name", "dp_rank", "tp_rank"],
            registry=self.registry,
        )
        self._num_tp_workers: dict[int, int] = {}  # per DP rank, from its last stats

    def _make_counters(self) -> None:
        def counter(name: str, doc: str) -> Counter:
            metric = Counter(name, doc, ["model_name"], registry=self.registry)
            return metric.labels(self.model_name)

        self._prompt_tokens = counter("pd:prompt_tokens_total", "Prompt tokens processed.")
        self._generation_tokens = counter("pd:generation_tokens_total", "Tokens generated.")
        self._prefix_queries = counter(
            "pd:prefix_cache_queries_total",
            "Prompt tokens of finished requests, each looked up in the prefix cache of the "
            "rank that prefilled it.",
        )
        self._prefix_hits = counter(
            "pd:prefix_cache_hits_total",
            "Prompt tokens of finished requests served from a prefix cache (not computed).",
        )
        success = Counter(
            "pd:request_success_total",
            "Finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._finished = {r: success.labels(self.model_name, r) for r in FINISHED_REASONS}
        self._taken = Counter(
            "pd:dp_rank_requests_total",
            "Requests (each choice of n) each local DP rank took into its engine: sent by "
            "this API server, or, in a splitwise cluster, dispatched to it or adopted.",
            ["model_name", "dp_rank"],
            registry=self.registry,
        )
        self._dummy_steps = Counter(
            "pd:dp_dummy_steps_total",
            "Lockstep DP (MoE over DP ranks): forwards a DP rank ran with nothing of its "
            "own, so that its group's collectives match.",
            ["model_name", "dp_rank"],
            registry=self.registry,
        )
        self._expert_tokens = Counter(
            "pd:moe_expert_tokens_total",
            "Tokens each DP rank routed to each expert, summed over the MoE layers.",
            ["model_name", "dp_rank", "expert"],
            registry=self.registry,
        )
        self._expert_imbalance = Gauge(
            "pd:moe_expert_imbalance",
            "Tokens of the busiest expert over the mean of all experts (1.0: even), over "
            "this API server's DP ranks since start.",
            ["model_name"],
            registry=self.registry,
        )
        # Running totals from the engines' stats, as last counted: key -> total
        self._totals: dict[tuple, int] = {}
        self._expert_totals: dict[int, list[int]] = {}  # dp rank -> per expert

    def _make_histograms(self) -> None:
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry)
            return metric.labels(self.model_name)

        self._ttft = histogram(
            "pd:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS
        )
        self._inter_token = histogram(
            "pd:inter_token_latency_seconds",
            "Time between consecutive output tokens (time per output token).",
            INTER_TOKEN_BUCKETS,
        )
        self._e2e = histogram(
            "pd:e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS
        )

    def _make_kv_transfer_metrics(self) -> None:
        """A prefill rank's KV hand-offs (DESIGN.md step 4), by transfer protocol."""
        labels = ["model_name", "protocol"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        self._kv_bytes = histogram(
            "pd:kv_transfer_bytes", "KV bytes written to a decode rank per request.",
            KV_BYTES_BUCKETS,
        )  # fmt: skip
        self._kv_seconds = histogram(
            "pd:kv_transfer_seconds",
            "From a request's first KV write until all its writes landed.",
            KV_SECONDS_BUCKETS,
        )
        self._kv_gbps = histogram(
            "pd:kv_transfer_gbps", "KV transfer speed per request (GB/s).", KV_GBPS_BUCKETS
        )
        self._kv_events = {
            "transfer_failed": counter(
                "pd:kv_transfer_failures_total", "KV writes that failed or timed out."
            ),
            "reserve_refused": counter(
                "pd:kv_reservation_refusals_total",
                "Reserve calls a decode rank refused (no room, incompatible layout, ...).",
            ),
            "redispatched": counter(
                "pd:requests_redispatched_total",
                "Requests handed off again to another decode rank after a failure.",
            ),
        }

    def observe_kv_events(self, events: list) -> None:
        """[kind, protocol, bytes, seconds] events from the engine's stats."""
        for kind, protocol, nbytes, seconds in events:
            if kind == "transfer":
                self._kv_bytes.labels(self.model_name, protocol).observe(nbytes)
                self._kv_seconds.labels(self.model_name, protocol).observe(seconds)
                gbps = nbytes / seconds / 1e9 if seconds > 0 else 0.0
                self._kv_gbps.labels(self.model_name, protocol).observe(gbps)
            elif kind in self._kv_events:
                self._kv_events[kind].labels(self.model_name, protocol).inc()

    def observe_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self._inter_token.observe(seconds)

    def observe_finished(
        self,
        reason: str,
        e2e_seconds: float,
        num_prompt_tokens: int,
        num_generation_tokens: int,
    ) -> None:
        """One finished request; ``reason`` is one of ``FINISHED_REASONS``."""
        if reason not in self._finished:
            raise ValueError(f"finish reason must be one of {FINISHED_REASONS}, got {reason!r}")
        self._finished[reason].inc()
        self._e2e.observe(e2e_seconds)
        self._prompt_tokens.inc(num_prompt_tokens)
        self._generation_tokens.inc(num_generation_tokens)

    def observe_prefix_cache(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        self._prefix_queries.inc(num_prompt_tokens)
        self._prefix_hits.inc(num_cached_tokens)

    def set_engine_stats(
        self, dp_rank: int, running: int, waiting: int, free_blocks: int, total_blocks: int
    ) -> None:
        labels = (self.model_name, str(dp_rank))
        self._num_running.labels(*labels).set(running)
        self._num_waiting.labels(*labels).set(waiting)
        self._num_free_blocks.labels(*labels).set(free_blocks)
        usage = 1.0 - free_blocks / total_blocks if total_blocks > 0 else 0.0
        self._kv_usage.labels(*labels).set(min(max(usage, 0.0), 1.0))

    def set_tp_workers(self, dp_rank: int, alive: list[bool]) -> None:
        self._num_tp_workers[dp_rank] = len(alive)
        for rank, up in enumerate(alive):
            self._tp_worker_up.labels(self.model_name, str(dp_rank), str(rank)).set(int(up))

    def set_dp_rank_up(self, dp_rank: int, up: bool) -> None:
        """A rank that went down runs and holds nothing: its load gauges read 0 again (not
        its last stats, which a sum over ranks would keep counting), and its TP workers,
        which exit with it, are down."""
        self._dp_rank_up.labels(self.model_name, str(dp_rank)).set(int(up))
        if not up:
            self.set_engine_stats(dp_rank, 0, 0, 0, 0)
            self.set_tp_workers(dp_rank, [False] * self._num_tp_workers.get(dp_rank, 0))

    def set_engine_totals(
        self, dp_rank: int, requests_taken: int, dummy_steps: int, expert_tokens: list[int]
    ) -> None:
        """The running totals an engine reports with its stats, into counters."""
        rank = str(dp_rank)
        self._add_total(self._taken, (self.model_name, rank), requests_taken)
        self._add_total(self._dummy_steps, (self.model_name, rank), dummy_steps)
        for expert, total in enumerate(expert_tokens):
            self._add_total(self._expert_tokens, (self.model_name, rank, str(expert)), total)
        if expert_tokens:
            self._expert_totals[dp_rank] = list(expert_tokens)
            per_expert = [sum(c) for c in zip(*self._expert_totals.values(), strict=True)]
            mean = sum(per_expert) / len(per_expert)
            self._expert_imbalance.labels(self.model_name).set(
                max(per_expert) / mean if mean else 1.0
            )

    def _add_total(self, counter: Counter, labels: tuple[str, ...], total: int) -> None:
        key = (counter._name, *labels)
        delta = total - self._totals.get(key, 0)
        if delta > 0:
            counter.labels(*labels).inc(delta)
            self._totals[key] = total

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def add_metrics_route(
        self, app: FastAPI, path: str = "/metrics", dependencies: list | None = None
    ) -> None:
        async def metrics() -> Response:
            payload, content_type = self.render()
            return Response(payload, media_type=content_type)

        app.add_api_route(
            path, metrics, methods=["GET"], include_in_schema=False, dependencies=dependencies
        )

    def make_metrics_app(self, dependencies: list | None = None) -> FastAPI:
        """A bare app serving ``GET /metrics``, for a separate ``--metrics-port``."""
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
        self.add_metrics_route(app, dependencies=dependencies)
        return app
