"""Tests of traffic reports: batching in workers, replay in the supervisor.

Every test is pure: reports go from a worker's `ReportingHealthTable` to
the supervisor's `HealthTable` through the JSON encoding, with fake clocks
and no sockets.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pgproxy.config.models import ClusterConfig, OutlierDetectionConfig
from pgproxy.graph.settings import ClusterSettings, settings_from_config
from pgproxy.graph.types import Cluster, Endpoint
from pgproxy.health.reports import (
    EndpointOutcomes,
    OutcomeReport,
    ReportingHealthTable,
    apply_report,
    decode_report,
    encode_report,
)
from pgproxy.health.state import HealthTable, Status


class FakeClock:
    """A clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cluster(
    count: int = 2, failures: int = 3, percent: int = 50, base: str = "10s"
) -> Cluster:
    addresses = [f"10.0.0.{i + 1}:8000" for i in range(count)]
    config = ClusterConfig(
        endpoints=addresses,
        outlier_detection=OutlierDetectionConfig(
            consecutive_failures=failures,
            base_ejection_time=base,
            max_ejection_time="5m",
            max_ejection_percent=percent,
        ),
    )
    endpoints = tuple(
        Endpoint(address, address.split(":")[0], 8000, False, 1, "api")
        for address in addresses
    )
    return Cluster("api", endpoints, settings_from_config(ClusterSettings, config))


class Worker:
    """A worker's reporting table and its report, on a fake clock."""

    def __init__(self, cluster: Cluster, clock: FakeClock) -> None:
        self.report = OutcomeReport()
        self.table = ReportingHealthTable({"api": cluster}, clock, self.report)

    def send(self) -> list[EndpointOutcomes]:
        """Take the report through the wire format, as the channel does."""
        message: dict[str, Any] = json.loads(
            json.dumps(encode_report(self.report.take()))
        )
        return decode_report(message)


def make_setup(
    cluster: Cluster, workers: int = 2
) -> tuple[HealthTable, list[Worker], FakeClock]:
    clock = FakeClock()
    supervisor = HealthTable({"api": cluster}, clock)
    return supervisor, [Worker(cluster, clock) for _ in range(workers)], clock


# OutcomeReport and ReportingHealthTable in a worker.


def test_runs_compress_outcomes() -> None:
    cluster = make_cluster()
    first, second = cluster.endpoints
    _, [worker], _ = make_setup(cluster, workers=1)
    table = worker.table

    for _ in range(50):
        table.record_success(first)
    table.record_failure(first, "connect_failure")
    table.record_failure(first, "http_503")
    table.record_success(first)
    table.record_success(first)
    table.record_failure(second, "http_502", 4)

    assert len(worker.report) == 4
    assert worker.report.take() == [
        EndpointOutcomes("api", first.address, ((0, ""), (2, "http_503"), (0, ""))),
        EndpointOutcomes("api", second.address, ((4, "http_502"),)),
    ]
    assert len(worker.report) == 0
    assert worker.report.take() == []


def test_success_reported_again_after_take() -> None:
    cluster = make_cluster()
    endpoint = cluster.endpoints[0]
    _, [worker], _ = make_setup(cluster, workers=1)

    worker.table.record_success(endpoint)
    worker.report.take()
    worker.table.record_success(endpoint)

    assert worker.report.take() == [
        EndpointOutcomes("api", endpoint.address, ((0, ""),))
    ]


def test_reporting_table_never_ejects() -> None:
    cluster = make_cluster(failures=1)
    endpoint = cluster.endpoints[0]
    _, [worker], _ = make_setup(cluster, workers=1)

    for _ in range(20):
        worker.table.record_failure(endpoint, "connect_failure")

    assert worker.table.is_available(endpoint)
    assert worker.table.ejections_total == 0
    assert worker.table.pop_transitions() == []
    assert worker.report.take() == [
        EndpointOutcomes("api", endpoint.address, ((20, "connect_failure"),))
    ]


def test_unknown_endpoint_not_reported() -> None:
    cluster = make_cluster()
    _, [worker], _ = make_setup(cluster, workers=1)
    other = Endpoint("10.9.9.9:80", "10.9.9.9", 80, False, 1, "web")

    worker.table.record_success(other)
    worker.table.record_failure(other, "connect_failure")

    assert len(worker.report) == 0


def test_report_calls_on_pending_when_started_and_full() -> None:
    cluster = make_cluster()
    endpoint = cluster.endpoints[0]
    report = OutcomeReport(max_runs=4)
    table = ReportingHealthTable({"api": cluster}, FakeClock(), report)
    calls: list[int] = []
    report.on_pending = lambda: calls.append(len(report))

    for _ in range(3):
        table.record_success(endpoint)
        table.record_failure(endpoint, "http_503")
    full = report.full
    report.take()
    table.record_success(endpoint)

    assert calls == [1, 4, 1]
    assert full
    assert not report.full


def test_successor_reports_into_same_report() -> None:
    cluster = make_cluster()
    endpoint = cluster.endpoints[0]
    _, [worker], _ = make_setup(cluster, workers=1)
    worker.table.record_success(endpoint)
    worker.table.record_failure(endpoint, "http_503")
    worker.table.apply_ejection(endpoint, 30.0, "ejected by the supervisor")

    successor = worker.table.successor({"api": cluster})
    successor.record_failure(endpoint, "http_503")
    successor.record_success(endpoint)
    successor.record_success(endpoint)

    assert isinstance(successor, ReportingHealthTable)
    assert successor.report is worker.report
    assert not successor.is_available(endpoint)
    assert worker.report.take() == [
        EndpointOutcomes("api", endpoint.address, ((0, ""), (2, "http_503"), (0, "")))
    ]


def test_successor_flag_after_success_run() -> None:
    cluster = make_cluster()
    endpoint = cluster.endpoints[0]
    _, [worker], _ = make_setup(cluster, workers=1)
    worker.table.record_success(endpoint)

    # The new record starts unflagged; its success joins the old run.
    successor = worker.table.successor({"api": cluster})
    successor.record_success(endpoint)
    first = worker.report.take()
    successor.record_success(endpoint)

    assert first == [EndpointOutcomes("api", endpoint.address, ((0, ""),))]
    assert worker.report.take() == first


# apply_report in the supervisor.


def test_failures_of_two_workers_eject_once() -> None:
    cluster = make_cluster(failures=3)
    endpoint = cluster.endpoints[0]
    supervisor, workers, _ = make_setup(cluster)

    workers[0].table.record_failure(endpoint, "connect_failure")
    workers[0].table.record_failure(endpoint, "connect_failure")
    workers[1].table.record_failure(endpoint, "http_503")
    first = apply_report(supervisor, workers[0].send())
    available = supervisor.is_available(endpoint)
    second = apply_report(supervisor, workers[1].send())

    assert first == []
    assert available
    assert second == [endpoint]
    assert not supervisor.is_available(endpoint)
    [transition] = supervisor.pop_transitions()
    assert transition.new is Status.EJECTED
    assert "3 failures in a row, last: http_503" in transition.reason
    assert supervisor.ejections_total == 1


def test_success_of_other_worker_resets_count() -> None:
    cluster = make_cluster(failures=3)
    endpoint = cluster.endpoints[0]
    supervisor, workers, _ = make_setup(cluster)

    workers[0].table.record_failure(endpoint, "http_503", 2)
    apply_report(supervisor, workers[0].send())
    workers[1].table.record_success(endpoint)
    apply_report(supervisor, workers[1].send())
    workers[0].table.record_failure(endpoint, "http_503", 2)
    changed = apply_report(supervisor, workers[0].send())

    assert changed == []
    assert supervisor.is_available(endpoint)
    failures = supervisor.snapshot()["api"][endpoint.address]["consecutive_failures"]
    assert failures == 2


@pytest.mark.parametrize(
    ("outcomes", "ejected"),
    [
        ("FFSF", False),  # the success resets the count in order
        ("FSFFF", True),
        ("FFFS", True),  # the success comes after the ejection
        ("SSSFFF", True),
    ],
)
def test_order_within_report(outcomes: str, ejected: bool) -> None:
    cluster = make_cluster(failures=3)
    endpoint = cluster.endpoints[0]
    supervisor, [worker], _ = make_setup(cluster, workers=1)

    for outcome in outcomes:
        if outcome == "S":
            worker.table.record_success(endpoint)
        else:
            worker.table.record_failure(endpoint, "http_503")
    apply_report(supervisor, worker.send())

    assert supervisor.is_available(endpoint) is not ejected


def test_max_ejection_percent_across_workers() -> None:
    cluster = make_cluster(count=4, failures=2, percent=25)
    first, second = cluster.endpoints[:2]
    supervisor, workers, _ = make_setup(cluster)

    workers[0].table.record_failure(first, "http_503", 2)
    workers[1].table.record_failure(second, "http_503", 2)
    changed = apply_report(supervisor, workers[0].send())
    changed += apply_report(supervisor, workers[1].send())

    assert changed == [first]
    assert not supervisor.is_available(first)
    assert supervisor.is_available(second)


def test_ejection_time_grows_across_workers() -> None:
    cluster = make_cluster(failures=2, base="10s")
    endpoint = cluster.endpoints[0]
    supervisor, workers, clock = make_setup(cluster)

    workers[0].table.record_failure(endpoint, "http_503")
    workers[1].table.record_failure(endpoint, "http_503")
    apply_report(supervisor, workers[0].send())
    apply_report(supervisor, workers[1].send())
    first = supervisor.ejection_deadline(endpoint) - clock.now
    clock.now += first
    workers[1].table.record_failure(endpoint, "http_503", 2)
    changed = apply_report(supervisor, workers[1].send())
    second = supervisor.ejection_deadline(endpoint) - clock.now

    assert (first, second) == (10.0, 20.0)
    assert changed == [endpoint]
    transitions = supervisor.pop_transitions()
    assert [item.new for item in transitions] == [
        Status.EJECTED,
        Status.HEALTHY,
        Status.EJECTED,
    ]


def test_report_ends_finished_ejection() -> None:
    cluster = make_cluster(failures=2, base="10s")
    endpoint = cluster.endpoints[0]
    supervisor, [worker], clock = make_setup(cluster, workers=1)
    supervisor.record_failure(endpoint, "http_503", 2)
    clock.now += 10

    worker.table.record_failure(endpoint, "http_503")
    changed = apply_report(supervisor, worker.send())

    assert changed == [endpoint]
    assert supervisor.ejection_deadline(endpoint) == 0.0
    assert supervisor.is_available(endpoint)


def test_cap_within_report_goes_to_first_endpoint() -> None:
    cluster = make_cluster(count=4, failures=1, percent=25)
    first, second = cluster.endpoints[:2]
    supervisor, [worker], _ = make_setup(cluster, workers=1)

    worker.table.record_success(first)
    worker.table.record_failure(second, "http_503")
    worker.table.record_failure(first, "http_503")
    changed = apply_report(supervisor, worker.send())

    # One process would have ejected `second`, whose failure came first.
    assert changed == [first]


def test_unknown_endpoints_skipped() -> None:
    cluster = make_cluster()
    supervisor, _, _ = make_setup(cluster)
    outcomes = [EndpointOutcomes("web", "10.0.0.1:8000", ((5, "http_503"),))]

    assert apply_report(supervisor, outcomes) == []
    assert supervisor.pop_transitions() == []


def test_replay_matches_one_process() -> None:
    """Two workers' reports, applied in order, decide as one table would.

    Without a cap on ejections, because a report groups outcomes by
    endpoint (see `test_cap_within_report_goes_to_first_endpoint`).
    """
    rng = random.Random(11)
    for _ in range(100):
        cluster = make_cluster(count=3, failures=rng.randint(1, 4), percent=100)
        supervisor, workers, clock = make_setup(cluster)
        single = HealthTable({"api": cluster}, clock)
        for _ in range(rng.randint(1, 8)):
            worker = rng.choice(workers)
            # One report: every outcome of it reaches the single table in
            # the order the supervisor replays it.
            for _ in range(rng.randint(1, 10)):
                endpoint = rng.choice(cluster.endpoints)
                if rng.random() < 0.4:
                    worker.table.record_success(endpoint)
                    single.record_success(endpoint)
                else:
                    worker.table.record_failure(endpoint, "http_503")
                    single.record_failure(endpoint, "http_503")
            apply_report(supervisor, worker.send())
            clock.now += rng.choice([0.0, 5.0, 20.0])
        assert supervisor.snapshot() == single.snapshot()
        assert supervisor.ejections_total == single.ejections_total


# The wire format.


def test_report_round_trip() -> None:
    outcomes = [
        EndpointOutcomes("api", "10.0.0.1:8000", ((0, ""), (3, "http_503"))),
        EndpointOutcomes("web", "[::1]:80", ((1, "connect_failure"),)),
    ]

    message = json.loads(json.dumps(encode_report(outcomes)))

    assert message["op"] == "outcomes"
    assert decode_report(message) == outcomes


@pytest.mark.parametrize(
    "rows",
    [
        None,
        "api",
        [["api", "10.0.0.1:8000"]],
        [["api", 8000, []]],
        [["api", "10.0.0.1:8000", "runs"]],
        [["api", "10.0.0.1:8000", [[1]]]],
        [["api", "10.0.0.1:8000", [[-1, "x"]]]],
        [["api", "10.0.0.1:8000", [[True, "x"]]]],
        [["api", "10.0.0.1:8000", [[1.5, "x"]]]],
        [["api", "10.0.0.1:8000", [[1, None]]]],
    ],
)
def test_malformed_report_rejected(rows: object) -> None:
    with pytest.raises(ValueError):
        decode_report({"op": "outcomes", "endpoints": rows})
