"""Tests of the pure health state machine, driven by a fake clock."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

import pgproxy
import pgproxy.health.state as state_module
from pgproxy.config.models import (
    ClusterConfig,
    HealthCheckConfig,
    OutlierDetectionConfig,
)
from pgproxy.graph.settings import (
    ClusterSettings,
    OutlierDetectionSettings,
    settings_from_config,
)
from pgproxy.graph.types import Cluster, Endpoint
from pgproxy.health.state import (
    EndpointHealth,
    HealthTable,
    Status,
    Transition,
    ejection_time,
    max_ejected,
)


class FakeClock:
    """A clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_cluster(
    name: str = "api",
    count: int = 4,
    *,
    rise: int = 2,
    fall: int = 3,
    active: bool = True,
    failures: int = 3,
    base: str = "10s",
    cap: str = "35s",
    percent: int = 50,
    enabled: bool = True,
) -> Cluster:
    addresses = [f"10.0.0.{i + 1}:8000" for i in range(count)]
    check = (
        HealthCheckConfig(healthy_threshold=rise, unhealthy_threshold=fall)
        if active
        else None
    )
    config = ClusterConfig(
        endpoints=list(addresses),
        health_check=check,
        outlier_detection=OutlierDetectionConfig(
            enabled=enabled,
            consecutive_failures=failures,
            base_ejection_time=base,
            max_ejection_time=cap,
            max_ejection_percent=percent,
        ),
    )
    endpoints = tuple(
        Endpoint(address, address.split(":")[0], 8000, False, 1, name)
        for address in addresses
    )
    return Cluster(name, endpoints, settings_from_config(ClusterSettings, config))


def make_table(*clusters: Cluster) -> tuple[HealthTable, FakeClock]:
    clock = FakeClock()
    return HealthTable({c.name: c for c in clusters}, clock), clock


def fail(table: HealthTable, endpoint: Endpoint, times: int) -> None:
    for _ in range(times):
        table.record_failure(endpoint, "connection refused")


# Active checks: rise and fall thresholds.


def test_endpoint_healthy_before_any_probe() -> None:
    cluster = make_cluster()
    table, _ = make_table(cluster)
    assert all(table.is_available(ep) for ep in cluster.endpoints)
    assert not table.all_unavailable("api")


def test_fall_threshold_marks_unhealthy() -> None:
    cluster = make_cluster(fall=3)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    assert table.record_probe(endpoint, False, "status 500") is None
    assert table.record_probe(endpoint, False, "status 500") is None
    assert table.is_available(endpoint)
    transition = table.record_probe(endpoint, False, "status 503")
    assert transition is not None
    assert transition.old is Status.HEALTHY
    assert transition.new is Status.UNHEALTHY
    assert "3 probe(s) in a row failed" in transition.reason
    assert "status 503" in transition.reason
    assert transition.went_down
    assert not table.is_available(endpoint)


def test_success_interrupts_failure_streak() -> None:
    cluster = make_cluster(fall=2)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    table.record_probe(endpoint, False, "timeout")
    table.record_probe(endpoint, True, "ok")
    assert table.record_probe(endpoint, False, "timeout") is None
    assert table.is_available(endpoint)


def test_rise_threshold_marks_healthy_again() -> None:
    cluster = make_cluster(rise=2, fall=1)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    table.record_probe(endpoint, False, "refused")
    assert not table.is_available(endpoint)
    assert table.record_probe(endpoint, True, "ok") is None
    assert not table.is_available(endpoint)
    transition = table.record_probe(endpoint, True, "ok")
    assert transition == Transition(
        endpoint, Status.UNHEALTHY, Status.HEALTHY, "2 probe(s) in a row succeeded"
    )
    assert transition.came_back
    assert table.is_available(endpoint)


def test_failure_interrupts_success_streak() -> None:
    cluster = make_cluster(rise=2, fall=1)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    table.record_probe(endpoint, False, "refused")
    table.record_probe(endpoint, True, "ok")
    table.record_probe(endpoint, False, "refused")
    assert table.record_probe(endpoint, True, "ok") is None
    assert not table.is_available(endpoint)


def test_thresholds_of_one_flip_at_once() -> None:
    cluster = make_cluster(rise=1, fall=1)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    assert table.record_probe(endpoint, False, "x") is not None
    assert table.record_probe(endpoint, True, "ok") is not None
    assert table.is_available(endpoint)


def test_repeated_results_report_no_transition() -> None:
    cluster = make_cluster(rise=1, fall=1)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    assert table.record_probe(endpoint, True, "ok") is None
    table.record_probe(endpoint, False, "x")
    assert table.record_probe(endpoint, False, "x") is None


# Passive checks: outlier detection.


def test_consecutive_failures_eject() -> None:
    cluster = make_cluster(failures=3)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    fail(table, endpoint, 2)
    assert table.is_available(endpoint)
    assert table.pop_transitions() == []
    fail(table, endpoint, 1)
    assert not table.is_available(endpoint)
    [transition] = table.pop_transitions()
    assert transition.old is Status.HEALTHY
    assert transition.new is Status.EJECTED
    assert "3 failures in a row" in transition.reason
    assert "connection refused" in transition.reason
    assert table.pop_transitions() == []


def test_success_resets_failure_count() -> None:
    cluster = make_cluster(failures=3)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    fail(table, endpoint, 2)
    table.record_success(endpoint)
    fail(table, endpoint, 2)
    assert table.is_available(endpoint)
    assert table.snapshot()["api"][endpoint.address]["consecutive_failures"] == 2


def test_ejection_ends_after_base_time() -> None:
    cluster = make_cluster(failures=1, base="10s")
    endpoint = cluster.endpoints[0]
    table, clock = make_table(cluster)
    fail(table, endpoint, 1)
    table.pop_transitions()
    clock.advance(9.9)
    assert not table.is_available(endpoint)
    assert table.expire_ejections() == []
    clock.advance(0.1)
    assert table.is_available(endpoint)
    [transition] = table.expire_ejections()
    assert transition.old is Status.EJECTED
    assert transition.new is Status.HEALTHY
    assert transition.reason == "ejection time is over"
    assert table.expire_ejections() == []


def test_ejection_time_grows_and_is_capped() -> None:
    cluster = make_cluster(failures=1, base="10s", cap="35s")
    endpoint = cluster.endpoints[0]
    table, clock = make_table(cluster)
    lengths = []
    for _ in range(5):
        fail(table, endpoint, 1)
        ejected_until = table.snapshot()["api"][endpoint.address]["ejected_until"]
        assert isinstance(ejected_until, float)
        lengths.append(ejected_until - clock.now)
        clock.now = ejected_until
        table.expire_ejections()
    assert lengths == [10.0, 20.0, 30.0, 35.0, 35.0]


def test_ejection_count_decays_after_good_time() -> None:
    cluster = make_cluster(failures=1, base="10s", cap="100s")
    endpoint = cluster.endpoints[0]
    table, clock = make_table(cluster)
    for _ in range(3):
        fail(table, endpoint, 1)
        clock.advance(60)
        table.expire_ejections()
    # The third ejection (30 s) ended 30 s ago: three periods of 10 s without
    # an ejection bring the multiplier from 3 down to 0.
    assert table.snapshot()["api"][endpoint.address]["ejections"] == 0
    fail(table, endpoint, 1)
    ejected_until = table.snapshot()["api"][endpoint.address]["ejected_until"]
    assert ejected_until == clock.now + 10.0


def test_ejection_count_decays_partially() -> None:
    cluster = make_cluster(failures=1, base="10s", cap="100s")
    endpoint = cluster.endpoints[0]
    table, clock = make_table(cluster)
    fail(table, endpoint, 1)  # 10 s
    clock.advance(10)
    fail(table, endpoint, 1)  # 20 s
    clock.advance(20 + 15)  # one full good period of 10 s after the end
    assert table.snapshot()["api"][endpoint.address]["ejections"] == 1
    fail(table, endpoint, 1)
    ejected_until = table.snapshot()["api"][endpoint.address]["ejected_until"]
    assert ejected_until == clock.now + 20.0


def test_failures_during_ejection_do_not_extend_it() -> None:
    cluster = make_cluster(failures=2, base="10s")
    endpoint = cluster.endpoints[0]
    table, clock = make_table(cluster)
    fail(table, endpoint, 2)
    until = table.snapshot()["api"][endpoint.address]["ejected_until"]
    clock.advance(5)
    fail(table, endpoint, 5)
    snapshot = table.snapshot()["api"][endpoint.address]
    assert snapshot["ejected_until"] == until
    assert snapshot["ejections"] == 1
    assert snapshot["consecutive_failures"] == 0


def test_failure_count_restarts_after_ejection() -> None:
    cluster = make_cluster(failures=3, base="10s")
    endpoint = cluster.endpoints[0]
    table, clock = make_table(cluster)
    fail(table, endpoint, 3)
    clock.advance(10)
    fail(table, endpoint, 2)
    assert table.is_available(endpoint)
    transitions = table.pop_transitions()
    assert [t.new for t in transitions] == [Status.EJECTED, Status.HEALTHY]
    fail(table, endpoint, 1)
    assert not table.is_available(endpoint)


def test_disabled_outlier_detection_never_ejects() -> None:
    cluster = make_cluster(failures=1, enabled=False)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    fail(table, endpoint, 50)
    assert table.is_available(endpoint)
    assert table.pop_transitions() == []


def test_good_probe_does_not_end_ejection() -> None:
    cluster = make_cluster(failures=1, rise=1)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    fail(table, endpoint, 1)
    assert table.record_probe(endpoint, True, "ok") is None
    assert not table.is_available(endpoint)


def test_unhealthy_outranks_ejection() -> None:
    cluster = make_cluster(failures=1, fall=1, base="10s")
    endpoint = cluster.endpoints[0]
    table, clock = make_table(cluster)
    fail(table, endpoint, 1)
    transition = table.record_probe(endpoint, False, "refused")
    assert transition is not None
    assert transition.old is Status.EJECTED
    assert transition.new is Status.UNHEALTHY
    assert not transition.went_down
    clock.advance(10)
    assert table.expire_ejections() == []
    assert not table.is_available(endpoint)


# Cap on ejected endpoints.


@pytest.mark.parametrize(
    ("count", "percent", "allowed"),
    [
        (10, 50, 5),
        (10, 10, 1),
        (10, 0, 0),
        (3, 10, 1),
        (2, 50, 1),
        (2, 100, 2),
        (1, 50, 0),
        (1, 99, 0),
        (1, 100, 1),
        (0, 50, 0),
    ],
)
def test_max_ejected(count: int, percent: int, allowed: int) -> None:
    assert max_ejected(count, percent) == allowed


def test_max_ejection_percent_limits_ejections() -> None:
    cluster = make_cluster(count=4, failures=1, percent=50)
    table, _ = make_table(cluster)
    for endpoint in cluster.endpoints:
        fail(table, endpoint, 1)
    available = [table.is_available(ep) for ep in cluster.endpoints]
    assert available == [False, False, True, True]
    assert len(table.pop_transitions()) == 2


def test_failure_ejects_once_slot_frees() -> None:
    cluster = make_cluster(count=2, failures=2, percent=50, base="10s")
    first, second = cluster.endpoints
    table, clock = make_table(cluster)
    fail(table, first, 2)
    fail(table, second, 3)
    assert table.is_available(second)
    clock.advance(10)
    fail(table, second, 1)
    assert not table.is_available(second)
    assert table.is_available(first)


def test_single_endpoint_cluster_not_ejected() -> None:
    cluster = make_cluster(count=1, failures=1, percent=50)
    [endpoint] = cluster.endpoints
    table, _ = make_table(cluster)
    fail(table, endpoint, 10)
    assert table.is_available(endpoint)


def test_single_endpoint_ejected_at_100_percent() -> None:
    cluster = make_cluster(count=1, failures=1, percent=100)
    [endpoint] = cluster.endpoints
    table, _ = make_table(cluster)
    fail(table, endpoint, 1)
    assert not table.is_available(endpoint)
    assert table.all_unavailable("api")


def test_unhealthy_endpoints_do_not_use_ejection_slots() -> None:
    cluster = make_cluster(count=2, failures=1, fall=1, percent=50)
    first, second = cluster.endpoints
    table, _ = make_table(cluster)
    table.record_probe(first, False, "refused")
    fail(table, second, 1)
    assert not table.is_available(second)
    assert table.all_unavailable("api")


# Whole-table queries.


def test_all_unavailable_by_active_checks() -> None:
    cluster = make_cluster(count=2, fall=1)
    table, _ = make_table(cluster)
    table.record_probe(cluster.endpoints[0], False, "x")
    assert not table.all_unavailable("api")
    table.record_probe(cluster.endpoints[1], False, "x")
    assert table.all_unavailable("api")
    assert not table.all_unavailable("unknown")


def test_all_unavailable_ends_with_ejection() -> None:
    cluster = make_cluster(count=2, failures=1, percent=100, base="10s")
    table, clock = make_table(cluster)
    for endpoint in cluster.endpoints:
        fail(table, endpoint, 1)
    assert table.all_unavailable("api")
    clock.advance(10)
    assert not table.all_unavailable("api")


def test_unknown_endpoint_is_available() -> None:
    cluster = make_cluster()
    table, _ = make_table(cluster)
    stranger = Endpoint("10.9.9.9:1", "10.9.9.9", 1, False, 1, "api")
    assert table.is_available(stranger)
    table.record_failure(stranger, "x")
    table.record_success(stranger)
    assert table.record_probe(stranger, False, "x") is None


def test_clusters_are_independent() -> None:
    api = make_cluster("api", count=1, fall=1)
    web = make_cluster("web", count=1, fall=1)
    table, _ = make_table(api, web)
    # Same address in both clusters: separate state.
    assert api.endpoints[0].address == web.endpoints[0].address
    table.record_probe(api.endpoints[0], False, "x")
    assert not table.is_available(api.endpoints[0])
    assert table.is_available(web.endpoints[0])


def test_cluster_without_check_flips_on_each_probe() -> None:
    cluster = make_cluster(active=False)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)
    assert table.record_probe(endpoint, False, "x") is not None
    assert table.record_probe(endpoint, True, "ok") is not None


def test_snapshot_shape() -> None:
    cluster = make_cluster(count=2, failures=1, fall=1)
    first, second = cluster.endpoints
    table, clock = make_table(cluster)
    clock.advance(5)
    table.record_probe(first, False, "status 500")
    fail(table, second, 1)
    snapshot = table.snapshot()
    assert set(snapshot) == {"api"}
    assert snapshot["api"][first.address] == {
        "status": "unhealthy",
        "reason": "1 probe(s) in a row failed, last: status 500",
        "since": 1005.0,
        "consecutive_probe_successes": 0,
        "consecutive_probe_failures": 1,
        "consecutive_failures": 0,
        "ejected_until": None,
        "ejections": 0,
    }
    ejected = snapshot["api"][second.address]
    assert ejected["status"] == "ejected"
    assert ejected["ejected_until"] == 1015.0
    assert ejected["ejections"] == 1


def test_repr_counts() -> None:
    cluster = make_cluster(count=3, failures=1, fall=1)
    table, _ = make_table(cluster)
    table.record_probe(cluster.endpoints[0], False, "x")
    fail(table, cluster.endpoints[1], 1)
    assert repr(table) == (
        "<HealthTable clusters=1 endpoints=3 healthy=1 unhealthy=1 ejected=1>"
    )


def test_pending_transitions_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "MAX_PENDING_TRANSITIONS", 1)
    cluster = make_cluster(count=4, failures=1, percent=100)
    table, _ = make_table(cluster)
    for endpoint in cluster.endpoints[:3]:
        fail(table, endpoint, 1)
    assert len(table.pop_transitions()) == 1
    assert table.dropped_transitions == 2


# Reload.


def test_carry_over_keeps_unchanged_endpoints() -> None:
    old_cluster = make_cluster(count=3, failures=1, fall=1)
    old, clock = make_table(old_cluster)
    old.record_probe(old_cluster.endpoints[0], False, "refused")
    fail(old, old_cluster.endpoints[1], 1)

    # The new config drops 10.0.0.3 and adds 10.0.0.4; order changes nothing.
    new_cluster = make_cluster(count=4, failures=1, fall=1)
    new_cluster = Cluster(
        "api",
        tuple(reversed([new_cluster.endpoints[i] for i in (0, 1, 3)])),
        new_cluster.settings,
    )
    new = HealthTable({"api": new_cluster}, clock)
    new.carry_over(old)
    by_address = {ep.address: ep for ep in new_cluster.endpoints}
    assert not new.is_available(by_address["10.0.0.1:8000"])
    assert not new.is_available(by_address["10.0.0.2:8000"])
    assert new.is_available(by_address["10.0.0.4:8000"])
    assert new.snapshot()["api"]["10.0.0.2:8000"]["ejections"] == 1

    # The tables share no state after the copy.
    old.record_probe(old_cluster.endpoints[0], True, "ok")
    assert not new.is_available(by_address["10.0.0.1:8000"])


def test_carry_over_ignores_other_clusters() -> None:
    old_cluster = make_cluster("api", count=1, fall=1)
    old, clock = make_table(old_cluster)
    old.record_probe(old_cluster.endpoints[0], False, "refused")
    moved = make_cluster("web", count=1, fall=1)
    new = HealthTable({"web": moved}, clock)
    new.carry_over(old)
    assert new.is_available(moved.endpoints[0])


def test_successor_carries_state() -> None:
    cluster = make_cluster(count=2, failures=1)
    table, clock = make_table(cluster)
    fail(table, cluster.endpoints[0], 1)

    successor = table.successor({"api": cluster})
    clock.advance(10)

    assert type(successor) is HealthTable
    assert successor.ejection_deadline(cluster.endpoints[0]) == 1010.0
    assert successor.is_available(cluster.endpoints[0])  # the same clock


# Failure runs and ejections decided by another table.


def test_failure_run_ejects_at_threshold() -> None:
    cluster = make_cluster(failures=3)
    endpoint = cluster.endpoints[0]
    table, _ = make_table(cluster)

    table.record_failure(endpoint, "http_503", 2)
    available = table.is_available(endpoint)
    table.record_failure(endpoint, "http_503", 5)

    assert available
    [transition] = table.pop_transitions()
    assert transition.new is Status.EJECTED
    assert "3 failures in a row, last: http_503" in transition.reason
    assert table.snapshot()["api"][endpoint.address]["consecutive_failures"] == 0


def test_failure_run_matches_single_failures() -> None:
    rng = random.Random(7)
    for _ in range(200):
        cluster = make_cluster(count=3, failures=rng.randint(1, 4), percent=40)
        singles, singles_clock = make_table(cluster)
        runs, runs_clock = make_table(cluster)
        for _ in range(rng.randint(1, 12)):
            endpoint = rng.choice(cluster.endpoints)
            count = rng.randint(0, 5)
            if count == 0:
                singles.record_success(endpoint)
                runs.record_success(endpoint)
            else:
                fail(singles, endpoint, count)
                runs.record_failure(endpoint, "connection refused", count)
            step = rng.choice([0.0, 3.0, 10.0])
            singles_clock.advance(step)
            runs_clock.advance(step)
        assert runs.snapshot() == singles.snapshot()
        assert runs.pop_transitions() == singles.pop_transitions()
        assert runs.ejections_total == singles.ejections_total


def test_apply_ejection_starts_and_ends() -> None:
    cluster = make_cluster(count=2)
    endpoint = cluster.endpoints[0]
    table, clock = make_table(cluster)

    started = table.apply_ejection(endpoint, 30.0, "3 failures in a row")
    deadline = table.ejection_deadline(endpoint)
    clock.advance(5)
    ended = table.apply_ejection(endpoint, 0.0, "ejection time is over")

    assert started is not None
    assert (started.new, started.reason) == (Status.EJECTED, "3 failures in a row")
    assert deadline == 1030.0
    assert ended is not None
    assert ended.new is Status.HEALTHY
    assert table.is_available(endpoint)
    assert table.ejection_deadline(endpoint) == 0.0
    assert table.reason(endpoint) == "ejection time is over"
    assert table.ejections_total == 0  # counted by the table that decided


def test_applied_ejection_ends_on_own_clock() -> None:
    cluster = make_cluster(count=2)
    endpoint = cluster.endpoints[0]
    table, clock = make_table(cluster)
    table.apply_ejection(endpoint, 10.0, "ejected")
    table.pop_transitions()

    clock.advance(10)

    assert table.is_available(endpoint)
    [transition] = table.expire_ejections()
    assert transition.new is Status.HEALTHY


def test_apply_ejection_unknown_endpoint() -> None:
    table, _ = make_table(make_cluster("api"))
    other = make_cluster("web").endpoints[0]

    assert table.apply_ejection(other, 10.0, "ejected") is None
    assert table.ejection_deadline(other) == 0.0
    assert table.reason(other) == ""


def test_ejection_time_formula() -> None:
    outlier = settings_from_config(
        OutlierDetectionSettings,
        OutlierDetectionConfig(base_ejection_time="30s", max_ejection_time="5m"),
    )
    assert [ejection_time(n, outlier) for n in (1, 2, 10, 11)] == [
        30.0,
        60.0,
        300.0,
        300.0,
    ]


def test_state_module_is_sans_io() -> None:
    # The source, also when the module runs compiled (its __file__ is a .so).
    tree = ast.parse((Path(pgproxy.__file__).parent / "health/state.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"anyio", "asyncio", "socket", "ssl", "httpcore", "logging", "time"}
    assert imported & forbidden == set()


def _slots_in_source() -> set[str]:
    source = (Path(pgproxy.__file__).parent / "health/endpoint.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "EndpointHealth":
            for statement in node.body:
                if (
                    isinstance(statement, ast.Assign)
                    and isinstance(statement.targets[0], ast.Name)
                    and statement.targets[0].id == "__slots__"
                ):
                    return set(ast.literal_eval(statement.value))
    raise AssertionError("EndpointHealth.__slots__ not found")


def test_copy_from_takes_every_field() -> None:
    endpoint = Endpoint("127.0.0.1:8080", "127.0.0.1", 8080, False, 1, "api")
    old, new = EndpointHealth(endpoint, 1.0), EndpointHealth(endpoint, 2.0)
    values = {
        "healthy": False,
        "consecutive_probe_successes": 3,
        "consecutive_probe_failures": 4,
        "consecutive_failures": 5,
        "ejected_until": 6.0,
        "ejection_ended_at": 7.0,
        "ejections": 8,
        "status": Status.EJECTED,
        "reason": "reset",
        "since": 9.0,
    }
    for name, value in values.items():
        setattr(old, name, value)
    old.success_reported = True

    new.copy_from(old)

    assert set(values) | {"endpoint", "success_reported"} == _slots_in_source()
    for name, value in values.items():
        assert getattr(new, name) == value, name
    assert new.success_reported is False
