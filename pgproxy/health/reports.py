"""Outcomes of real traffic that a worker reports to its supervisor, in batches.

With `[server] workers` above one, the supervisor runs the one passive state
machine (outlier detection) for all workers. So the consecutive failures of
an endpoint count across every worker's traffic, `max_ejection_percent`
applies to the whole cluster, and each ejection is logged once. A worker's
health table is a `ReportingHealthTable`: `record_success` and
`record_failure` add to an `OutcomeReport` instead of counting. The worker
sends the report at most `FLUSH_DELAY_S` after the first outcome in it, or
as soon as it contains `MAX_REPORT_RUNS` runs, and the supervisor replays it
with `apply_report`. Ejections travel back as in `pgproxy.health.shared`.

A report keeps the order of one worker's outcomes per endpoint, compressed
into runs: failures in a row become one run `[count, last reason]`, and
successes in a row one run `[0, ""]`. Replaying the runs gives the same
counts and ejections as replaying every outcome, because one success resets
the failure count as well as many do. Successes are reported even by a
worker that saw no failure, because they break the run of another
worker's failures. Reports of different workers interleave in the order
the supervisor receives them, so an ejection can come up to one flush delay
later than in a single process, and outcomes less than one flush delay
apart in two workers count in arrival order, not in the order they
happened. A report groups its runs by endpoint, so when several endpoints
of a cluster reach the threshold in one report and `max_ejection_percent`
leaves room for fewer, the endpoints ejected are those whose first outcome
in the report came first.

Invariant: once the report being collected ends with a success for an
endpoint, another success there costs one flag test (`success_reported`),
so a report grows with endpoints and with changes between success and
failure, not with requests.

Message, a JSON object on the control channel:
`{"op": "outcomes", "endpoints": [[cluster, address, [[failures, reason],
...]], ...]}`.

This module is sans-IO.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pgproxy.graph.types import Cluster, Endpoint
from pgproxy.health.state import EndpointHealth, HealthTable

REPORT_OP = "outcomes"

# A worker sends its report at most this long after the first outcome in it.
# Longer delays an ejection, shorter costs more messages under steady traffic
# (one per worker per delay, each with a run for every endpoint that served).
FLUSH_DELAY_S = 0.1
# A report with this many runs is sent at once, which bounds the message
# (about 40 bytes a run) when successes and failures alternate quickly.
MAX_REPORT_RUNS = 1000


@dataclass(frozen=True, slots=True)
class EndpointOutcomes:
    """The outcomes of one endpoint in one report, as runs in order.

    Each run is `(failures, last reason)` for failures in a row, or
    `(0, "")` for one or more successes in a row.
    """

    cluster: str
    address: str
    runs: tuple[tuple[int, str], ...]


class OutcomeReport:
    """Traffic outcomes that a worker has not sent yet, per endpoint, in order.

    It outlives the health tables of reloads, so outcomes recorded just
    before a reload are sent with the next report. `on_pending` is called
    when the first run enters an empty report and when the report becomes
    full, so a sender can start its delay, and stop it.
    """

    def __init__(self, max_runs: int = MAX_REPORT_RUNS) -> None:
        self.max_runs = max_runs
        self.on_pending: Callable[[], None] | None = None
        self._runs: dict[tuple[str, str], list[list[Any]]] = {}
        self._count = 0
        # Records whose `success_reported` flag this report set.
        self._flagged: list[EndpointHealth] = []

    def __repr__(self) -> str:
        return f"<OutcomeReport endpoints={len(self._runs)} runs={self._count}>"

    def __len__(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        """Whether the report contains `max_runs` runs or more."""
        return self._count >= self.max_runs

    def add_success(self, state: EndpointHealth) -> None:
        """Add a success of `state`'s endpoint; later ones are free until `take`."""
        state.success_reported = True
        self._flagged.append(state)
        runs = self._runs.get((state.endpoint.cluster, state.endpoint.address))
        # A reload's new record starts unflagged behind a success run.
        if runs and runs[-1][0] == 0:
            return
        self._append(state.endpoint, 0, "")

    def add_failure(self, state: EndpointHealth, reason: str, count: int = 1) -> None:
        """Add `count` failures in a row, the last for `reason`."""
        state.success_reported = False
        runs = self._runs.get((state.endpoint.cluster, state.endpoint.address))
        if runs and runs[-1][0] > 0:
            runs[-1][0] += count
            runs[-1][1] = reason
            return
        self._append(state.endpoint, count, reason)

    def take(self) -> list[EndpointOutcomes]:
        """Return every endpoint's runs and start an empty report."""
        for state in self._flagged:
            state.success_reported = False
        self._flagged = []
        taken = [
            EndpointOutcomes(cluster, address, tuple((n, r) for n, r in runs))
            for (cluster, address), runs in self._runs.items()
        ]
        self._runs, self._count = {}, 0
        return taken

    def _append(self, endpoint: Endpoint, failures: int, reason: str) -> None:
        key = (endpoint.cluster, endpoint.address)
        runs = self._runs.get(key)
        if runs is None:
            runs = self._runs[key] = []
        runs.append([failures, reason])
        self._count += 1
        if self.on_pending is not None and (
            self._count == 1 or self._count == self.max_runs
        ):
            self.on_pending()


class ReportingHealthTable(HealthTable):
    """A worker's health table: reports traffic outcomes instead of ejecting.

    Active state comes from the supervisor's probe outcomes and ejections
    from `apply_ejection`, as the supervisor decides them.
    """

    def __init__(
        self,
        clusters: Mapping[str, Cluster],
        clock: Callable[[], float],
        report: OutcomeReport,
    ) -> None:
        super().__init__(clusters, clock)
        self.report = report

    def record_success(self, endpoint: Endpoint) -> None:
        """Add a good outcome of real traffic to the report."""
        state = self._state(endpoint)
        if state is not None and not state.success_reported:
            self.report.add_success(state)

    def record_failure(self, endpoint: Endpoint, reason: str, count: int = 1) -> None:
        """Add `count` failures in a row of real traffic to the report."""
        state = self._state(endpoint)
        if state is not None:
            self.report.add_failure(state, reason, count)

    def _create(self, clusters: Mapping[str, Cluster]) -> HealthTable:
        return ReportingHealthTable(clusters, self._clock, self.report)


def encode_report(outcomes: Iterable[EndpointOutcomes]) -> dict[str, Any]:
    """Return the control message that carries `outcomes`."""
    rows = [
        [item.cluster, item.address, [list(run) for run in item.runs]]
        for item in outcomes
    ]
    return {"op": REPORT_OP, "endpoints": rows}


def decode_report(message: Mapping[str, Any]) -> list[EndpointOutcomes]:
    """Return the outcomes of an `outcomes` message; raise ValueError when malformed."""
    rows = message.get("endpoints")
    if not isinstance(rows, list):
        raise ValueError(f"expected a list of endpoints, got {type(rows).__name__}")
    decoded = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 3:
            raise ValueError(f"expected [cluster, address, runs], got {row!r}")
        cluster, address, runs = row
        if not isinstance(cluster, str) or not isinstance(address, str):
            raise ValueError(f"expected cluster and address strings in {row!r}")
        if not isinstance(runs, list):
            raise ValueError(f"expected a list of runs in {row!r}")
        decoded.append(EndpointOutcomes(cluster, address, _decode_runs(runs)))
    return decoded


def apply_report(
    table: HealthTable, outcomes: Iterable[EndpointOutcomes]
) -> list[Endpoint]:
    """Replay `outcomes` in `table`; return the endpoints whose ejection changed.

    A changed endpoint was ejected, or its ejection ended because its time
    was over. Endpoints the table does not track are skipped: a worker can
    report on a graph that a reload is replacing.
    """
    changed = []
    for item in outcomes:
        endpoint = table.endpoint(item.cluster, item.address)
        if endpoint is None:
            continue
        before = table.ejection_deadline(endpoint)
        for failures, reason in item.runs:
            if failures:
                table.record_failure(endpoint, reason, failures)
            else:
                table.record_success(endpoint)
        if table.ejection_deadline(endpoint) != before:
            changed.append(endpoint)
    return changed


def _decode_runs(runs: list[Any]) -> tuple[tuple[int, str], ...]:
    decoded = []
    for run in runs:
        if (
            not isinstance(run, list)
            or len(run) != 2
            or not isinstance(run[0], int)
            or isinstance(run[0], bool)
            or run[0] < 0
            or not isinstance(run[1], str)
        ):
            raise ValueError(f"expected a run [failures >= 0, reason], got {run!r}")
        decoded.append((run[0], run[1]))
    return tuple(decoded)
