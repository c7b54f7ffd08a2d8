"""Health decided once by the supervisor and fed to every worker.

With `[server] workers = N` the supervisor probes each endpoint once per
interval, not N times, and logs each health change once. Every probe
outcome goes to every worker as it is, and each worker's `HealthTable`
applies the thresholds (see `pgproxy.health.shared` for why outcomes and not
state). Passive health goes the other way first: workers report the
outcomes of their traffic (`pgproxy.health.reports`). The supervisor
replays them in its table in the order the reports arrive. Then it sends
every ejection this causes, and its end, to every worker.

Invariants:
- Probes run for the graph in force: started with the supervisor and
  restarted by `install` when a reload commits, with the state of kept
  endpoints (probe counts, failure counts, ejections) carried over, as a
  single process does.
- An outcome is forwarded only when it was recorded in the table in force,
  so the supervisor's table and the workers' tables get the same outcomes.
- Every change of an ejection in the table in force is sent to every
  worker: a new ejection with the seconds it has left, its end with 0. The
  end is sent when the supervisor's table ends the ejection, at its
  deadline. The workers end it at the same time on their own clock.
- Forwarding does not await a worker: each slot has a `HealthFeed`, an
  outbox that is appended to without waiting and that a task of the slot
  drains to the control channel. A new
  worker process gets the table's state at the moment its outbox opens (the
  active state and the ejections in force) and every change after it. When
  more than `MAX_QUEUED_OUTCOMES` probe outcomes wait (the worker stopped
  reading), they are replaced by one message with the whole active state,
  and ejections wait as one entry per endpoint, so the supervisor's memory
  stays bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import anyio.abc

from pgproxy.graph.types import Endpoint, Graph
from pgproxy.health.active import run_active_checks
from pgproxy.health.passive import flush_transitions
from pgproxy.health.reports import EndpointOutcomes, apply_report, decode_report
from pgproxy.health.shared import (
    EJECTIONS_OP,
    STATE_OP,
    Ejection,
    EndpointProbeState,
    ProbeOutcome,
    capture_ejections,
    capture_probe_state,
    encode_ejections,
    encode_outcomes,
    encode_probe_state,
)
from pgproxy.health.state import HealthTable
from pgproxy.server.control import Channel, ChannelClosedError, Message

logger = logging.getLogger(__name__)

# A worker that stays this many outcomes behind gets the whole state instead.
MAX_QUEUED_OUTCOMES = 10_000
# The shortest wait for the next ejection to end, so that a clock that reads
# a little behind the table's cannot make the loop spin.
MIN_EJECTION_WAIT_S = 0.01

EndpointKey = tuple[str, str]  # (cluster, address)
EJECTION_OVER = "ejection time is over"


class HealthFeed:
    """The health messages exchanged with the worker process of one slot.

    `open` starts queueing for a new process and returns the state it starts
    from, `run` sends what is queued until the channel closes, and `close`
    drops what is left when the process exits. `receive_report` takes the
    worker's traffic report to the supervisor's table.
    """

    def __init__(self, health: SharedHealth) -> None:
        self._health = health
        self._queued: list[ProbeOutcome] = []
        # Ejection changes by endpoint: deadline on the health clock, 0.0
        # for an ended ejection, and the reason.
        self._ejections: dict[EndpointKey, tuple[float, str]] = {}
        self._resync = False
        self._open = False
        self._wake = anyio.Event()
        self.resyncs = 0  # outboxes replaced by the whole state

    def __repr__(self) -> str:
        return (
            f"<HealthFeed open={self._open} queued={len(self._queued)} "
            f"ejections={len(self._ejections)} resyncs={self.resyncs}>"
        )

    def open(self) -> dict[str, list[list[Any]]]:
        """Queue every change from now on; return the state before them.

        The keys are those of the `start` message: `probe_state` and
        `ejections`, encoded.
        """
        self._queued, self._ejections, self._resync = [], {}, False
        self._open = True
        return {
            "probe_state": encode_probe_state(self._health.state()),
            "ejections": encode_ejections(self._health.ejections()),
        }

    def close(self) -> None:
        """Stop queueing and drop what was not sent: the process has exited."""
        self._queued, self._ejections, self._resync = [], {}, False
        self._open = False

    def push_outcome(self, outcome: ProbeOutcome) -> None:
        """Queue one probe outcome for the worker, unless no process is running."""
        if not self._open:
            return  # the next process starts from the state at `open`
        if self._resync:
            return  # the state sent next includes this outcome
        if len(self._queued) >= MAX_QUEUED_OUTCOMES:
            self._queued, self._resync = [], True
            self.resyncs += 1
        else:
            self._queued.append(outcome)
        self._wake.set()

    def push_ejection(self, key: EndpointKey, deadline: float, reason: str) -> None:
        """Queue an ejection until `deadline` (0.0: its end) for the worker."""
        if not self._open:
            return
        self._ejections[key] = (deadline, reason)
        self._wake.set()

    def receive_report(self, message: Message, worker: str) -> None:
        """Replay the `outcomes` message of `worker` in the supervisor's table."""
        try:
            outcomes = decode_report(message)
        except ValueError as error:
            # Its outcomes are lost, so ejections may need more failures.
            logger.error("ignored an invalid traffic report from %s: %s", worker, error)
            return
        self._health.record_report(outcomes)

    def next_message(self) -> Message | None:
        """Return the next message to send, and remove its content from the outbox.

        Probe messages come first; ejections follow in one message, each
        with the seconds it has left at this moment.
        """
        if self._resync:
            self._resync = False
            return {"op": STATE_OP, "state": encode_probe_state(self._health.state())}
        if self._queued:
            outcomes, self._queued = self._queued, []
            return encode_outcomes(outcomes)
        if self._ejections:
            changes, self._ejections = self._ejections, {}
            now = self._health.now()
            ejections = []
            for (cluster, address), (deadline, reason) in changes.items():
                if deadline > now:
                    ejections.append(Ejection(cluster, address, deadline - now, reason))
                else:
                    # Over by the time the worker reads it: send its end.
                    ended = reason if not deadline else EJECTION_OVER
                    ejections.append(Ejection(cluster, address, 0.0, ended))
            return {"op": EJECTIONS_OP, "ejections": encode_ejections(ejections)}
        return None

    async def run(self, channel: Channel) -> None:
        """Send what is queued, in order, until the channel closes."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while (message := self.next_message()) is not None:
                try:
                    await channel.send(message)
                except ChannelClosedError:
                    return


class SharedHealth:
    """The supervisor's health table, its probes and ejections, and the feeds."""

    def __init__(
        self, graph: Graph, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.graph = graph
        self.table = HealthTable(graph.clusters, clock)
        self.ejection_counts: dict[EndpointKey, int] = {}  # for /metrics
        self._clock = clock
        self._feeds: list[HealthFeed] = []
        # Deadline of every ejection sent to the workers and not ended yet.
        self._ejected: dict[EndpointKey, float] = {}
        self._ejected_changed = anyio.Event()
        self._group: anyio.abc.TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return (
            f"<SharedHealth feeds={len(self._feeds)} ejected={len(self._ejected)} "
            f"{self.table!r}>"
        )

    def feed(self) -> HealthFeed:
        """Create the feed of one worker slot."""
        feed = HealthFeed(self)
        self._feeds.append(feed)
        return feed

    def now(self) -> float:
        """Return the health clock's reading, the time base of deadlines."""
        return self._clock()

    def state(self) -> list[EndpointProbeState]:
        """Return the active-check state of every endpoint of the graph in force."""
        return capture_probe_state(self.table)

    def ejections(self) -> list[Ejection]:
        """Return the ejections in force, with the seconds each has left."""
        return capture_ejections(self.table)

    def start(self, group: anyio.abc.TaskGroup) -> None:
        """Start probing the graph in force, and ending ejections, in `group`."""
        self._group = group
        group.start_soon(self._end_ejections)
        self._start_loops()

    def install(self, graph: Graph) -> None:
        """Probe `graph` from now on; kept endpoints keep their state."""
        table = self.table.successor(graph.clusters)
        self.stop()
        self.graph, self.table = graph, table
        self._start_loops()

    def stop(self) -> None:
        """Stop the probes of the graph in force."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    def record_report(self, outcomes: Iterable[EndpointOutcomes]) -> None:
        """Replay a worker's traffic report; log and send the ejections it causes."""
        changed = apply_report(self.table, outcomes)
        for endpoint in changed:
            if self.table.ejection_deadline(endpoint):
                key = (endpoint.cluster, endpoint.address)
                self.ejection_counts[key] = self.ejection_counts.get(key, 0) + 1
        flush_transitions(self.table)
        keys = [(endpoint.cluster, endpoint.address) for endpoint in changed]
        self._send_changes([*keys, *self._ejected])

    def _send_changes(self, keys: Iterable[EndpointKey]) -> None:
        """Send every ejection of `keys` that differs from what the workers have."""
        for key in set(keys):
            endpoint = self.table.endpoint(*key)
            deadline = (
                0.0 if endpoint is None else self.table.ejection_deadline(endpoint)
            )
            if deadline == self._ejected.get(key, 0.0):
                continue
            if endpoint is not None and deadline:
                self._ejected[key] = deadline
                reason = self.table.reason(endpoint)
            else:
                del self._ejected[key]
                reason = EJECTION_OVER
            for feed in self._feeds:
                feed.push_ejection(key, deadline, reason)
            self._ejected_changed.set()

    async def _end_ejections(self) -> None:
        """End each ejection at its deadline: log it and send the end to the workers."""
        while True:
            flush_transitions(self.table)
            self._send_changes(list(self._ejected))
            wait = None
            if self._ejected:
                soonest = min(self._ejected.values()) - self._clock()
                wait = max(soonest, MIN_EJECTION_WAIT_S)
            with anyio.move_on_after(wait):
                await self._ejected_changed.wait()
            self._ejected_changed = anyio.Event()

    def _start_loops(self) -> None:
        if self._group is None:
            return
        scope = anyio.CancelScope()
        self._scope = scope
        graph, table = self.graph, self.table

        def forward(endpoint: Endpoint, ok: bool, reason: str) -> None:
            # A loop of a replaced graph can finish one probe after its
            # cancellation. That outcome is not in the table in force, so
            # forwarding it would put the workers ahead of the supervisor.
            if table is not self.table:
                return
            outcome = ProbeOutcome(endpoint.cluster, endpoint.address, ok, reason)
            for feed in self._feeds:
                feed.push_outcome(outcome)

        async def probe() -> None:
            with scope:
                await run_active_checks(graph, table, on_outcome=forward)

        self._group.start_soon(probe)
