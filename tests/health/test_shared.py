"""Tests of probe outcomes shared with workers: messages, applying, state."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

import pgproxy.health.shared as shared_module
from pgproxy.config.models import ClusterConfig, HealthCheckConfig
from pgproxy.graph.settings import ClusterSettings, settings_from_config
from pgproxy.graph.types import Cluster, Endpoint
from pgproxy.health.shared import (
    Ejection,
    EndpointProbeState,
    ProbeOutcome,
    apply_ejections,
    apply_outcomes,
    capture_ejections,
    capture_probe_state,
    decode_ejections,
    decode_outcomes,
    decode_probe_state,
    encode_ejections,
    encode_outcomes,
    encode_probe_state,
    restore_probe_state,
)
from pgproxy.health.state import HealthTable, Status

ADDRESSES = ("10.0.0.1:8000", "10.0.0.2:8000")


class FakeClock:
    """A clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cluster(rise: int = 2, fall: int = 3) -> Cluster:
    config = ClusterConfig(
        endpoints=list(ADDRESSES),
        health_check=HealthCheckConfig(
            healthy_threshold=rise, unhealthy_threshold=fall
        ),
    )
    endpoints = tuple(
        Endpoint(address, address.split(":")[0], 8000, False, 1, "api")
        for address in ADDRESSES
    )
    return Cluster("api", endpoints, settings_from_config(ClusterSettings, config))


def make_table(cluster: Cluster) -> HealthTable:
    return HealthTable({cluster.name: cluster}, FakeClock())


def outcome(ok: bool, address: str = ADDRESSES[0]) -> ProbeOutcome:
    return ProbeOutcome("api", address, ok, "status 200" if ok else "status 500")


def wire(message: dict[str, Any]) -> dict[str, Any]:
    """Return `message` as the control channel delivers it (through JSON)."""
    decoded: dict[str, Any] = json.loads(json.dumps(message))
    return decoded


# Messages.


def test_outcomes_round_trip() -> None:
    outcomes = [outcome(False), outcome(True, ADDRESSES[1]), outcome(False)]

    message = wire(encode_outcomes(outcomes))

    assert message["op"] == "probes"
    assert decode_outcomes(message) == outcomes


def test_probe_state_round_trip() -> None:
    states = [
        EndpointProbeState("api", ADDRESSES[0], False, 1, 0, "3 probe(s) failed"),
        EndpointProbeState("api", ADDRESSES[1], True, 0, 2, ""),
    ]

    rows = json.loads(json.dumps(encode_probe_state(states)))

    assert decode_probe_state(rows) == states


@pytest.mark.parametrize(
    "outcomes",
    [
        None,
        "api",
        [["api", ADDRESSES[0], True]],
        [["api", ADDRESSES[0], "yes", "ok"]],
        [["api", 8000, True, "ok"]],
        [{"cluster": "api"}],
    ],
)
def test_malformed_outcomes_rejected(outcomes: object) -> None:
    with pytest.raises(ValueError):
        decode_outcomes({"op": "probes", "outcomes": outcomes})


@pytest.mark.parametrize(
    "rows",
    [
        {},
        [["api", ADDRESSES[0], True, 0, 0]],
        [["api", ADDRESSES[0], True, True, 0, ""]],
        [["api", ADDRESSES[0], True, 0, -1, ""]],
        [["api", ADDRESSES[0], 1, 0, 0, ""]],
    ],
)
def test_malformed_probe_state_rejected(rows: object) -> None:
    with pytest.raises(ValueError):
        decode_probe_state(rows)


# Applying outcomes.


def test_outcomes_follow_thresholds() -> None:
    cluster = make_cluster(rise=2, fall=3)
    table = make_table(cluster)
    endpoint = cluster.endpoints[0]

    assert apply_outcomes(table, [outcome(False), outcome(False)]) == []
    assert table.is_available(endpoint)
    [down] = apply_outcomes(table, [outcome(False)])
    assert down.new is Status.UNHEALTHY
    assert "3 probe(s) in a row failed, last: status 500" in down.reason
    assert not table.is_available(endpoint)
    assert apply_outcomes(table, [outcome(True)]) == []
    [up] = apply_outcomes(table, [outcome(True)])
    assert up.came_back
    assert table.is_available(endpoint)


def test_outcomes_match_own_probes() -> None:
    # A worker that applies the supervisor's outcomes ends with the same
    # state as a process that recorded the probes itself.
    cluster = make_cluster(rise=2, fall=2)
    own, fed = make_table(cluster), make_table(cluster)
    sequence = [False, True, False, False, True, False, True, True, True]
    outcomes = [outcome(ok, ADDRESSES[i % 2]) for i, ok in enumerate(sequence)]

    for item in outcomes:
        endpoint = own.endpoint(item.cluster, item.address)
        assert endpoint is not None
        own.record_probe(endpoint, item.ok, item.reason)
    apply_outcomes(fed, outcomes)

    assert fed.snapshot() == own.snapshot()


def test_outcomes_of_unknown_endpoints_skipped() -> None:
    table = make_table(make_cluster(fall=1))
    before = table.snapshot()

    transitions = apply_outcomes(
        table,
        [
            ProbeOutcome("api", "10.0.0.9:8000", False, "refused"),
            ProbeOutcome("gone", ADDRESSES[0], False, "refused"),
        ],
    )

    assert transitions == []
    assert table.snapshot() == before


# Starting from the supervisor's state.


def test_restored_state_marks_endpoint_down() -> None:
    cluster = make_cluster(rise=2, fall=2)
    supervisor, worker = make_table(cluster), make_table(cluster)
    apply_outcomes(supervisor, [outcome(False), outcome(False), outcome(True)])

    [transition] = restore_probe_state(worker, capture_probe_state(supervisor))

    endpoint = cluster.endpoints[0]
    assert transition.new is Status.UNHEALTHY
    assert not worker.is_available(endpoint)
    assert worker.is_available(cluster.endpoints[1])
    state = worker.snapshot()["api"][ADDRESSES[0]]
    assert state["consecutive_probe_successes"] == 1
    assert state["consecutive_probe_failures"] == 0
    assert "2 probe(s) in a row failed" in str(state["reason"])


def test_restored_state_continues_counting() -> None:
    # One more good probe completes the rise threshold in both tables.
    cluster = make_cluster(rise=2, fall=2)
    supervisor, worker = make_table(cluster), make_table(cluster)
    apply_outcomes(supervisor, [outcome(False), outcome(False), outcome(True)])
    restore_probe_state(worker, capture_probe_state(supervisor))

    [in_supervisor] = apply_outcomes(supervisor, [outcome(True)])
    [in_worker] = apply_outcomes(worker, [outcome(True)])

    assert in_worker == in_supervisor
    assert worker.is_available(cluster.endpoints[0])


def test_restore_keeps_passive_ejection() -> None:
    cluster = make_cluster()
    worker = make_table(cluster)
    endpoint = cluster.endpoints[0]
    for _ in range(5):
        worker.record_failure(endpoint, "connection refused")
    assert worker.snapshot()["api"][ADDRESSES[0]]["status"] == "ejected"

    restore_probe_state(worker, capture_probe_state(make_table(cluster)))

    assert not worker.is_available(endpoint)
    assert worker.snapshot()["api"][ADDRESSES[0]]["status"] == "ejected"


def test_captured_state_counts_ejected_as_passing() -> None:
    cluster = make_cluster()
    table = make_table(cluster)
    for _ in range(5):
        table.record_failure(cluster.endpoints[0], "connection refused")

    states = {item.address: item for item in capture_probe_state(table)}

    assert states[ADDRESSES[0]].healthy is True


# Ejections decided by the supervisor.


def test_ejections_round_trip() -> None:
    ejections = [
        Ejection("api", ADDRESSES[0], 29.5, "3 failures in a row"),
        Ejection("api", ADDRESSES[1], 0.0, "ejection time is over"),
    ]

    rows = json.loads(json.dumps(encode_ejections(ejections)))

    assert decode_ejections(rows) == ejections


@pytest.mark.parametrize(
    "rows",
    [
        None,
        [["api", ADDRESSES[0], 1.0]],
        [["api", ADDRESSES[0], "1", "x"]],
        [["api", ADDRESSES[0], True, "x"]],
        [["api", ADDRESSES[0], -1.0, "x"]],
        [["api", ADDRESSES[0], float("nan"), "x"]],
        [["api", ADDRESSES[0], float("inf"), "x"]],
    ],
)
def test_malformed_ejections_rejected(rows: object) -> None:
    with pytest.raises(ValueError):
        decode_ejections(json.loads(json.dumps(rows)))


def test_whole_seconds_accepted() -> None:
    [ejection] = decode_ejections([["api", ADDRESSES[0], 30, "x"]])

    assert ejection.remaining == 30.0
    assert isinstance(ejection.remaining, float)


def test_capture_and_apply_ejections() -> None:
    cluster = make_cluster()
    clock = FakeClock()
    supervisor = HealthTable({"api": cluster}, clock)
    for _ in range(5):
        supervisor.record_failure(cluster.endpoints[0], "connection refused")
    clock.now += 4.0
    worker = HealthTable({"api": cluster}, clock)

    captured = capture_ejections(supervisor)
    transitions = apply_ejections(worker, captured)

    [ejection] = captured
    assert ejection.address == ADDRESSES[0]
    assert ejection.remaining == pytest.approx(26.0)
    assert "5 failures in a row" in ejection.reason
    assert [item.new for item in transitions] == [Status.EJECTED]
    assert worker.ejection_deadline(cluster.endpoints[0]) == pytest.approx(1030.0)
    assert worker.is_available(cluster.endpoints[1])


def test_apply_ejections_skips_unknown_endpoints() -> None:
    table = make_table(make_cluster())
    ejections = [
        Ejection("web", ADDRESSES[0], 30.0, "x"),
        Ejection("api", "10.9.9.9:80", 30.0, "x"),
    ]

    assert apply_ejections(table, ejections) == []
    assert capture_ejections(table) == []


def test_shared_module_is_sans_io() -> None:
    tree = ast.parse(Path(shared_module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    forbidden = {"anyio", "asyncio", "socket", "ssl", "httpcore", "logging", "time"}
    assert imported & forbidden == set()
