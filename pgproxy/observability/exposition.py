"""Prometheus text exposition of a metrics snapshot, with prometheus-client.

`MetricsRenderer.render` turns a `Snapshot` plus the serving process's own
state (reloads, workers) into the text format version 0.0.4. It adds the
standard `process_*` and `python_*` metrics of the rendering process and,
with several workers, each worker's process metrics as
`pgproxy_worker_process_*` with a `worker` label. The serving processes call
it in a worker thread, through `pgproxy.observability.scrape`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pgproxy.observability.metrics import LATENCY_BUCKETS, Snapshot
from pgproxy.observability.scrape import ServerState

_REQUEST_LABELS = ["listener", "route", "cluster"]
_ENDPOINT_LABELS = ["cluster", "endpoint"]


class MetricsRenderer:
    """Renders snapshots; owns a registry with the process collectors."""

    def __init__(self) -> None:
        self._collector = _SnapshotCollector()
        self._registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._registry)
        PlatformCollector(registry=self._registry)
        GCCollector(registry=self._registry)
        self._registry.register(self._collector)
        # The collector takes its inputs from an attribute, so two renders
        # from different threads must not interleave.
        self._lock = threading.Lock()

    def render(self, snapshot: Snapshot, server: ServerState) -> bytes:
        """Return the Prometheus text of `snapshot` and `server`."""
        with self._lock:
            self._collector.inputs = (snapshot, server)
            try:
                return generate_latest(self._registry)
            finally:
                self._collector.inputs = None


class _SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.inputs: tuple[Snapshot, ServerState] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.inputs is None:
            return []
        snapshot, server = self.inputs
        return [
            *request_families(snapshot),
            *endpoint_families(snapshot),
            *server_families(server),
            *worker_process_families(server.worker_pids),
        ]


def request_families(snapshot: Snapshot) -> Iterator[Metric]:
    """Yield request, retry and downstream connection families."""
    requests = CounterMetricFamily(
        "pgproxy_requests",
        "Requests answered, by listener, route, cluster and status.",
        labels=[*_REQUEST_LABELS, "status"],
    )
    latency = HistogramMetricFamily(
        "pgproxy_request_duration_seconds",
        "Time from the request's first byte to the response's last byte.",
        labels=_REQUEST_LABELS,
    )
    retries = CounterMetricFamily(
        "pgproxy_retries",
        "Extra attempts on another endpoint, by listener, route and cluster.",
        labels=_REQUEST_LABELS,
    )
    for key, stats in sorted(snapshot.requests.items()):
        if not stats.statuses:
            continue
        labels = list(key)
        for status, count in sorted(stats.statuses.items()):
            requests.add_metric([*labels, str(status)], count)
        latency.add_metric(labels, _cumulative(stats.buckets), stats.seconds_sum)
        retries.add_metric(labels, stats.retries)
    yield from (requests, latency, retries)

    opened = CounterMetricFamily(
        "pgproxy_downstream_connections",
        "Client connections accepted, by listener.",
        labels=["listener"],
    )
    open_now = GaugeMetricFamily(
        "pgproxy_downstream_connections_open",
        "Client connections open now, by listener.",
        labels=["listener"],
    )
    rejected = CounterMetricFamily(
        "pgproxy_downstream_connections_rejected",
        "Client connections closed at once because the listener or the process "
        "was at its connection limit, by listener.",
        labels=["listener"],
    )
    for name, counts in sorted(snapshot.connections.items()):
        opened.add_metric([name], counts[0])
        open_now.add_metric([name], counts[1])
        rejected.add_metric([name], counts[2])
    yield from (opened, open_now, rejected)


def endpoint_families(snapshot: Snapshot) -> Iterator[Metric]:
    """Yield endpoint health, ejection, failure and pool families."""
    healthy = GaugeMetricFamily(
        "pgproxy_endpoint_healthy",
        "1 when the endpoint may receive requests, 0 when it failed its checks "
        "or is ejected; with several workers, the share of workers that use it.",
        labels=_ENDPOINT_LABELS,
    )
    pool = GaugeMetricFamily(
        "pgproxy_pool_connections",
        "Upstream connections per endpoint, idle in the pool or active.",
        labels=[*_ENDPOINT_LABELS, "state"],
    )
    waiting = GaugeMetricFamily(
        "pgproxy_pool_waiting_requests",
        "Requests waiting for a connection to the endpoint because it is at "
        "its cluster's max_connections.",
        labels=_ENDPOINT_LABELS,
    )
    for (cluster, endpoint), reading in sorted(snapshot.endpoints.items()):
        healthy.add_metric([cluster, endpoint], reading.healthy)
        pool.add_metric([cluster, endpoint, "idle"], reading.idle)
        pool.add_metric([cluster, endpoint, "active"], reading.active)
        waiting.add_metric([cluster, endpoint], reading.waiting)
    ejections = CounterMetricFamily(
        "pgproxy_endpoint_ejections",
        "Passive ejections of an endpoint after failures of real traffic.",
        labels=_ENDPOINT_LABELS,
    )
    for key, count in sorted(snapshot.ejections.items()):
        ejections.add_metric(list(key), count)
    failures = CounterMetricFamily(
        "pgproxy_upstream_failures",
        "Failed attempts on an endpoint, by failure flag.",
        labels=[*_ENDPOINT_LABELS, "failure"],
    )
    for failure_key, count in sorted(snapshot.upstream_failures.items()):
        failures.add_metric(list(failure_key), count)
    yield from (healthy, pool, waiting, ejections, failures)


def server_families(server: ServerState) -> Iterator[Metric]:
    """Yield reload, config and worker families."""
    reloads = CounterMetricFamily(
        "pgproxy_reloads",
        "Config reloads, by outcome (success or failure).",
        labels=["outcome"],
    )
    for outcome in ("success", "failure"):
        reloads.add_metric([outcome], server.reloads.get(outcome, 0))
    yield reloads
    yield GaugeMetricFamily(
        "pgproxy_config_last_reload_successful",
        "1 when the last reload succeeded (or none was tried), 0 when it failed.",
        value=1.0 if server.last_reload_ok else 0.0,
    )
    if server.last_reload_time is not None:
        yield GaugeMetricFamily(
            "pgproxy_config_last_reload_timestamp_seconds",
            "Unix time of the last reload attempt.",
            value=server.last_reload_time,
        )
    info = GaugeMetricFamily(
        "pgproxy_config_info", "Hash of the config in force.", labels=["hash"]
    )
    info.add_metric([server.config_hash], 1.0)
    yield info
    yield GaugeMetricFamily(
        "pgproxy_workers", "Worker processes configured.", value=server.workers
    )
    yield CounterMetricFamily(
        "pgproxy_worker_restarts",
        "Worker processes restarted after they exited unexpectedly.",
        value=server.worker_restarts,
    )


def worker_process_families(worker_pids: Mapping[str, int]) -> Iterator[Metric]:
    """Yield each worker's `process_*` metrics with a `worker` label."""
    merged: dict[str, Metric] = {}
    for worker, pid in sorted(worker_pids.items()):
        collector = ProcessCollector(
            namespace="pgproxy_worker", pid=_constant(pid), registry=None
        )
        for family in collector.collect():
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type)
                merged[family.name] = target
            for sample in family.samples:
                labels = {**sample.labels, "worker": worker}
                target.add_sample(sample.name, labels, sample.value)
    yield from merged.values()


def _constant(pid: int) -> Callable[[], int]:
    return lambda: pid


def _cumulative(buckets: list[int]) -> list[tuple[str, float]]:
    total = 0
    result: list[tuple[str, float]] = []
    for bound, count in zip((*LATENCY_BUCKETS, float("inf")), buckets, strict=True):
        total += count
        result.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return result
