"""The Prometheus exposition: vLLM-style names, labels and histogram counts."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from pd.metrics import FINISHED_REASONS, ServerMetrics


def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    payload, _ = metrics.render()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(payload.decode())
        for sample in family.samples
    }


def value(metrics: ServerMetrics, name: str, **labels: str) -> float:
    key = tuple(sorted({"model_name": metrics.model_name, **labels}.items()))
    return samples(metrics)[(name, key)]


def test_names_and_labels_render():
    metrics = ServerMetrics("tiny-llama")
    payload, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    rendered = samples(metrics)
    assert {dict(labels)["model_name"] for _, labels in rendered} == {"tiny-llama"}
    names = {name for name, _ in rendered}
    assert {
        "pd:num_requests_running",
        "pd:num_requests_waiting",
        "pd:kv_cache_usage_perc",
        "pd:num_gpu_blocks_free",
        "pd:prompt_tokens_total",
        "pd:generation_tokens_total",
        "pd:request_success_total",
        "pd:time_to_first_token_seconds_bucket",
        "pd:inter_token_latency_seconds_bucket",
        "pd:e2e_request_latency_seconds_bucket",
    } <= names
    assert "# TYPE pd:time_to_first_token_seconds histogram" in payload.decode()
    for reason in FINISHED_REASONS:
        assert value(metrics, "pd:request_success_total", finished_reason=reason) == 0


def test_counters_and_histograms_count():
    metrics = ServerMetrics("m")
    metrics.observe_first_token(0.003)
    metrics.observe_first_token(2.0)
    for _ in range(5):
        metrics.observe_inter_token(0.02)
    metrics.observe_finished("stop", 1.2, num_prompt_tokens=10, num_generation_tokens=6)
    metrics.observe_finished("length", 70.0, num_prompt_tokens=4, num_generation_tokens=16)
    metrics.observe_finished("abort", 0.0005, num_prompt_tokens=3, num_generation_tokens=0)

    assert value(metrics, "pd:time_to_first_token_seconds_count") == 2
    assert value(metrics, "pd:time_to_first_token_seconds_bucket", le="0.005") == 1
    assert value(metrics, "pd:time_to_first_token_seconds_sum") == 2.003
    assert value(metrics, "pd:inter_token_latency_seconds_count") == 5
    assert value(metrics, "pd:inter_token_latency_seconds_bucket", le="0.01") == 0
    assert value(metrics, "pd:inter_token_latency_seconds_bucket", le="0.02") == 5
    assert value(metrics, "pd:e2e_request_latency_seconds_count") == 3
    assert value(metrics, "pd:e2e_request_latency_seconds_bucket", le="0.001") == 1
    assert value(metrics, "pd:e2e_request_latency_seconds_bucket", le="60.0") == 2
    assert value(metrics, "pd:e2e_request_latency_seconds_bucket", le="+Inf") == 3
    assert value(metrics, "pd:prompt_tokens_total") == 17
    assert value(metrics, "pd:generation_tokens_total") == 22
    finished = {
        r: value(metrics, "pd:request_success_total", finished_reason=r) for r in FINISHED_REASONS
    }
    assert finished == {"stop": 1, "length": 1, "abort": 1, "error": 0}


def test_unknown_finish_reason_is_refused():
    metrics = ServerMetrics("m")
    try:
        metrics.observe_finished("eos", 1.0, 1, 1)
    except ValueError as error:
        assert "eos" in str(error)
    else:
        raise AssertionError("an unknown finish reason was accepted")


def test_engine_stats_gauges():
    metrics = ServerMetrics("m")
    metrics.set_engine_stats(0, running=3, waiting=7, free_blocks=25, total_blocks=100)
    rank0 = {"dp_rank": "0"}
    assert value(metrics, "pd:num_requests_running", **rank0) == 3
    assert value(metrics, "pd:num_requests_waiting", **rank0) == 7
    assert value(metrics, "pd:num_gpu_blocks_free", **rank0) == 25
    assert value(metrics, "pd:kv_cache_usage_perc", **rank0) == 0.75
    metrics.set_engine_stats(0, running=0, waiting=0, free_blocks=0, total_blocks=0)
    assert value(metrics, "pd:kv_cache_usage_perc", **rank0) == 0.0


def test_per_dp_rank_series():
    metrics = ServerMetrics("m", dp_ranks=(2, 3))
    assert value(metrics, "pd:num_requests_running", dp_rank="3") == 0
    metrics.set_engine_stats(3, running=4, waiting=0, free_blocks=1, total_blocks=4)
    metrics.set_engine_totals(3, 1, 0, [])
    metrics.set_engine_totals(3, 1, 0, [])  # running totals: counted once
    metrics.set_dp_rank_up(2, False)
    assert value(metrics, "pd:num_requests_running", dp_rank="2") == 0
    assert value(metrics, "pd:num_requests_running", dp_rank="3") == 4
    assert value(metrics, "pd:dp_rank_requests_total", dp_rank="3") == 1
    assert value(metrics, "pd:dp_rank_requests_total", dp_rank="2") == 0
    assert value(metrics, "pd:dp_rank_up", dp_rank="2") == 0
    metrics.set_tp_workers(3, [True, True])
    metrics.set_dp_rank_up(3, False)  # its last stats no longer count
    assert value(metrics, "pd:tp_worker_up", dp_rank="3", tp_rank="1") == 0
    assert value(metrics, "pd:num_requests_running", dp_rank="3") == 0
    assert value(metrics, "pd:kv_cache_usage_perc", dp_rank="3") == 0


def test_registries_are_separate_from_each_other_and_the_global_one():
    first, second = ServerMetrics("a"), ServerMetrics("a")
    first.observe_finished("stop", 1.0, 1, 1)
    assert value(second, "pd:request_success_total", finished_reason="stop") == 0
    assert "pd:request_success_total" not in REGISTRY._names_to_collectors


def test_metrics_app_serves_the_exposition():
    metrics = ServerMetrics("m")
    metrics.observe_first_token(0.1)
    with TestClient(metrics.make_metrics_app()) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'pd:time_to_first_token_seconds_count{model_name="m"} 1.0' in response.text


def test_lockstep_and_expert_totals():
    metrics = ServerMetrics("m", dp_ranks=(0, 1))
    metrics.set_engine_totals(0, 2, 0, [6, 2, 0, 0])
    metrics.set_engine_totals(1, 0, 5, [0, 0, 0, 0])  # idle: dummy steps only
    metrics.set_engine_totals(0, 2, 0, [6, 2, 0, 0])
    assert value(metrics, "pd:dp_dummy_steps_total", dp_rank="1") == 5
    assert value(metrics, "pd:moe_expert_tokens_total", dp_rank="0", expert="0") == 6
    assert value(metrics, "pd:moe_expert_tokens_total", dp_rank="0", expert="1") == 2
    assert value(metrics, "pd:moe_expert_imbalance") == 3.0  # 6 over a mean of 2
