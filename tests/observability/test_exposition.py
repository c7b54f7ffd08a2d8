"""Tests of the Prometheus text rendering of metric snapshots."""

from __future__ import annotations

import os

from prometheus_client.parser import text_string_to_metric_families

from pgproxy.observability.exposition import MetricsRenderer
from pgproxy.observability.metrics import EndpointReading, Metrics
from pgproxy.observability.scrape import ServerState


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _render() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    metrics = Metrics()
    stats = metrics.request_stats("public", "api", "api")
    stats.observe(200, 0.004)
    stats.observe(200, 0.2)
    stats.observe(502, 0.004, attempts=2)
    metrics.connection_stats("public").connection_opened()
    metrics.record_ejection("api", "127.0.0.1:9")
    metrics.set_endpoint_source(
        lambda: [EndpointReading("api", "127.0.0.1:9", 0.0, 3, 1)]
    )
    server = ServerState(
        config_hash="abc123",
        reloads={"success": 2, "failure": 1},
        last_reload_time=1_700_000_000.0,
        last_reload_ok=False,
        workers=2,
        worker_restarts=1,
        worker_pids={"0": os.getpid()},
    )
    return _samples(MetricsRenderer().render(metrics.snapshot(), server))


def test_requests_by_status() -> None:
    samples = _render()
    labels = (("cluster", "api"), ("listener", "public"), ("route", "api"))

    assert samples[("pgproxy_requests_total", (*labels, ("status", "200")))] == 2
    assert samples[("pgproxy_requests_total", (*labels, ("status", "502")))] == 1
    assert samples[("pgproxy_retries_total", labels)] == 1


def test_latency_histogram_cumulative() -> None:
    samples = _render()
    labels = (("cluster", "api"), ("listener", "public"))
    route = (("route", "api"),)

    def bucket(le: str) -> float:
        key = tuple(sorted((*labels, *route, ("le", le))))
        return samples[("pgproxy_request_duration_seconds_bucket", key)]

    assert bucket("0.001") == 0
    assert bucket("0.005") == 2
    assert bucket("0.25") == 3
    assert bucket("+Inf") == 3
    count_key = ("pgproxy_request_duration_seconds_count", (*labels, *route))
    assert samples[count_key] == 3


def test_endpoint_and_pool_gauges() -> None:
    samples = _render()
    endpoint = (("cluster", "api"), ("endpoint", "127.0.0.1:9"))

    assert samples[("pgproxy_endpoint_healthy", endpoint)] == 0
    assert samples[("pgproxy_endpoint_ejections_total", endpoint)] == 1
    assert samples[("pgproxy_pool_connections", (*endpoint, ("state", "idle")))] == 3
    assert samples[("pgproxy_pool_connections", (*endpoint, ("state", "active")))] == 1


def test_server_families() -> None:
    samples = _render()

    assert samples[("pgproxy_reloads_total", (("outcome", "success"),))] == 2
    assert samples[("pgproxy_reloads_total", (("outcome", "failure"),))] == 1
    assert samples[("pgproxy_config_last_reload_successful", ())] == 0
    assert samples[("pgproxy_config_info", (("hash", "abc123"),))] == 1
    assert samples[("pgproxy_workers", ())] == 2
    assert samples[("pgproxy_worker_restarts_total", ())] == 1


def test_process_metrics_present() -> None:
    samples = _render()

    assert ("process_cpu_seconds_total", ()) in samples
    worker_rss = ("pgproxy_worker_process_resident_memory_bytes", (("worker", "0"),))
    assert samples[worker_rss] > 0
