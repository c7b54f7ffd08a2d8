"""Health state that a supervisor shares with its worker processes.

With `[server] workers` above one, only the supervisor probes, so each
endpoint gets one probe per interval whatever the number of workers. The
supervisor records every probe in its own `HealthTable`, logs the health
changes that causes (once, for all workers), and forwards the raw outcome
(cluster, address, ok, reason) to every worker. Each worker records it in
its own table with `HealthTable.record_probe`.

Why raw outcomes and not state changes: thresholds, reasons and the end of
a finished ejection on the next probe stay in `HealthTable`, one code path
for one process and for N. Every table gets the same outcomes in the same
order from the same starting state, so each worker reaches the supervisor's
verdict on the same probe, and the probe counts that /status shows stay
right in every worker. State changes would need a second way to set a
table's verdict and would leave those counts behind.

Invariant: a worker's active state equals the supervisor's once it has
applied every message sent so far. A worker that starts after the first
probe, or that fell too far behind, first gets the supervisor's active
state of every endpoint (verdict and probe counts), then the outcomes
recorded after it.

Passive health is decided by the supervisor too, from the traffic outcomes
that workers report (`pgproxy.health.reports`). Here the direction is the
other way: decisions, not outcomes, because only the supervisor counts
failures. An `Ejection` gives the seconds an ejection has left (0 when it
ended), not a clock reading, so the two processes need no common clock. A
worker ends an ejection when its time is over without waiting for the
message that ends it, so an ejection outlives its time by at most the
message's delay on the channel, and a lost message cannot keep an
endpoint out.

Messages, JSON objects on the control channel:
- `{"op": "probes", "outcomes": [[cluster, address, ok, reason], ...]}`
- `{"op": "probe_state", "state": [[cluster, address, healthy, successes,
  failures, reason], ...]}`; a worker's `start` message carries the same
  list under `probe_state`.
- `{"op": "ejections", "ejections": [[cluster, address, remaining_s,
  reason], ...]}`; a worker's `start` message carries the ejections in
  force under `ejections`.

This module is sans-IO.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pgproxy.health.state import HealthTable, Status, Transition

OUTCOMES_OP = "probes"
STATE_OP = "probe_state"
EJECTIONS_OP = "ejections"


@dataclass(frozen=True, slots=True)
class ProbeOutcome:
    """The result of one probe of the endpoint at `address` in `cluster`."""

    cluster: str
    address: str
    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class EndpointProbeState:
    """The active-check state of one endpoint: verdict and probe counts in a row."""

    cluster: str
    address: str
    healthy: bool
    successes: int
    failures: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ejection:
    """An ejection decided by the supervisor: seconds left, 0 when it ended."""

    cluster: str
    address: str
    remaining: float
    reason: str


def encode_outcomes(outcomes: Iterable[ProbeOutcome]) -> dict[str, Any]:
    """Return the control message that carries `outcomes`, in order."""
    rows = [[item.cluster, item.address, item.ok, item.reason] for item in outcomes]
    return {"op": OUTCOMES_OP, "outcomes": rows}


def decode_outcomes(message: Mapping[str, Any]) -> list[ProbeOutcome]:
    """Return the outcomes of a `probes` message; raise ValueError when malformed."""
    rows = _rows(message.get("outcomes"), (str, str, bool, str))
    return [ProbeOutcome(*row) for row in rows]


def capture_probe_state(table: HealthTable) -> list[EndpointProbeState]:
    """Return the active-check state of every endpoint of `table`."""
    states = []
    for cluster, endpoints in table.snapshot().items():
        for address, state in endpoints.items():
            states.append(
                EndpointProbeState(
                    cluster,
                    address,
                    # An ejected endpoint still passes its active checks.
                    state["status"] != Status.UNHEALTHY.value,
                    _count(state["consecutive_probe_successes"]),
                    _count(state["consecutive_probe_failures"]),
                    str(state["reason"]),
                )
            )
    return states


def encode_probe_state(states: Iterable[EndpointProbeState]) -> list[list[Any]]:
    """Return `states` as JSON-ready rows."""
    rows = []
    for item in states:
        counts = [item.successes, item.failures]
        rows.append([item.cluster, item.address, item.healthy, *counts, item.reason])
    return rows


def decode_probe_state(data: object) -> list[EndpointProbeState]:
    """Return the states in `encode_probe_state` rows; raise ValueError when bad."""
    rows = _rows(data, (str, str, bool, int, int, str))
    for row in rows:
        if row[3] < 0 or row[4] < 0:
            raise ValueError(f"negative probe count in {row!r}")
    return [EndpointProbeState(*row) for row in rows]


def apply_outcomes(
    table: HealthTable, outcomes: Iterable[ProbeOutcome]
) -> list[Transition]:
    """Record each outcome in `table`; return the status changes they caused.

    Outcomes of endpoints the table does not track are skipped: they were
    probed for another graph while a reload was in progress.
    """
    transitions = []
    for outcome in outcomes:
        endpoint = table.endpoint(outcome.cluster, outcome.address)
        if endpoint is None:
            continue
        transition = table.record_probe(endpoint, outcome.ok, outcome.reason)
        if transition is not None:
            transitions.append(transition)
    return transitions


def restore_probe_state(
    table: HealthTable, states: Iterable[EndpointProbeState]
) -> list[Transition]:
    """Set the active-check state of `table` from `states`; return the changes.

    Endpoints the table does not track are skipped, and endpoints missing
    from `states` keep their state.
    """
    transitions = []
    for item in states:
        endpoint = table.endpoint(item.cluster, item.address)
        if endpoint is None:
            continue
        transition = table.restore_probe_state(
            endpoint, item.healthy, item.successes, item.failures, item.reason
        )
        if transition is not None:
            transitions.append(transition)
    return transitions


def capture_ejections(table: HealthTable) -> list[Ejection]:
    """Return the ejections running in `table`, with the seconds each has left."""
    now = table.now()
    ejections = []
    for cluster, endpoints in table.snapshot().items():
        for address, state in endpoints.items():
            until = state["ejected_until"]
            if isinstance(until, float) and until > now:
                ejections.append(
                    Ejection(cluster, address, until - now, str(state["reason"]))
                )
    return ejections


def encode_ejections(ejections: Iterable[Ejection]) -> list[list[Any]]:
    """Return `ejections` as JSON-ready rows."""
    return [
        [item.cluster, item.address, item.remaining, item.reason] for item in ejections
    ]


def decode_ejections(data: object) -> list[Ejection]:
    """Return the ejections in `encode_ejections` rows; raise ValueError when bad."""
    rows = _rows(data, (str, str, float, str))
    for row in rows:
        if not 0 <= row[2] < float("inf"):
            raise ValueError(f"invalid remaining ejection time in {row!r}")
    return [Ejection(row[0], row[1], float(row[2]), row[3]) for row in rows]


def apply_ejections(
    table: HealthTable, ejections: Iterable[Ejection]
) -> list[Transition]:
    """Take over the supervisor's ejections in `table`; return the changes.

    Endpoints the table does not track are skipped, as in `apply_outcomes`.
    """
    transitions = []
    for item in ejections:
        endpoint = table.endpoint(item.cluster, item.address)
        if endpoint is None:
            continue
        transition = table.apply_ejection(endpoint, item.remaining, item.reason)
        if transition is not None:
            transitions.append(transition)
    return transitions


def _count(value: object) -> int:
    assert isinstance(value, int)  # HealthTable.snapshot stores ints here
    return value


def _rows(data: object, types: Sequence[type]) -> list[list[Any]]:
    """Check that `data` is a list of rows whose items have `types`, in order."""
    if not isinstance(data, list):
        raise ValueError(f"expected a list of rows, got {type(data).__name__}")
    for row in data:
        if not isinstance(row, list) or len(row) != len(types):
            raise ValueError(f"expected a row of {len(types)} items, got {row!r}")
        for value, expected in zip(row, types, strict=True):
            # JSON writes a float without a fraction as an int.
            accepted = (int, float) if expected is float else expected
            # bool is a subclass of int, so a number must not be a bool.
            if not isinstance(value, accepted) or (
                expected in (int, float) and isinstance(value, bool)
            ):
                raise ValueError(f"expected {expected.__name__} in {row!r}")
    return data
