"""Active health probes run once by the supervisor and fed to every worker.

With `[server] workers = N` the supervisor probes each endpoint once per
interval, not N times, and logs each health change once. Every outcome goes
to every worker as it is, and each worker's `HealthTable` applies the
thresholds (see `pgproxy.health.shared` for why outcomes and not state).

Invariants:
- Probes run for the graph in force: started with the supervisor and
  restarted by `install` when a reload commits, with the state of kept
  endpoints carried over, as a single process does.
- An outcome is forwarded only when it was recorded in the table in force,
  so the supervisor's table and the workers' tables get the same outcomes.
- Forwarding never waits for a worker. Each slot has a `ProbeFeed`, an
  outbox that a task of the slot drains to the control channel. A new
  worker process gets the table's state at the moment its outbox opens and
  every outcome after it. When more than `MAX_QUEUED_OUTCOMES` wait (the
  worker stopped reading), the outbox is replaced by one message with the
  whole state, so the supervisor's memory stays bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from pgproxy.graph.types import Endpoint, Graph
from pgproxy.health.active import run_active_checks
from pgproxy.health.shared import (
    STATE_OP,
    EndpointProbeState,
    ProbeOutcome,
    capture_probe_state,
    encode_outcomes,
    encode_probe_state,
)
from pgproxy.health.state import HealthTable
from pgproxy.server.control import Channel, ChannelClosedError, Message

logger = logging.getLogger(__name__)

# A worker that stays this many outcomes behind gets the whole state instead.
MAX_QUEUED_OUTCOMES = 10_000


class ProbeFeed:
    """The outbox of probe outcomes for the worker process of one slot.

    `open` starts queueing for a new process and returns the state it starts
    from, `run` sends what is queued until the channel closes, and `close`
    drops what is left when the process exits.
    """

    def __init__(self, state: Callable[[], list[EndpointProbeState]]) -> None:
        self._state = state
        self._queued: list[ProbeOutcome] = []
        self._resync = False
        self._open = False
        self._wake = anyio.Event()
        self.resyncs = 0  # outboxes replaced by the whole state

    def __repr__(self) -> str:
        return (
            f"<ProbeFeed open={self._open} queued={len(self._queued)} "
            f"resyncs={self.resyncs}>"
        )

    def open(self) -> list[list[Any]]:
        """Queue every outcome from now on; return the state before them, encoded."""
        self._queued, self._resync, self._open = [], False, True
        return encode_probe_state(self._state())

    def close(self) -> None:
        """Stop queueing and drop what was not sent: the process has exited."""
        self._queued, self._resync, self._open = [], False, False

    def push(self, outcome: ProbeOutcome) -> None:
        """Queue one outcome for the worker, unless no process is running."""
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

    def next_message(self) -> Message | None:
        """Return the message that carries everything queued, and empty the outbox."""
        if self._resync:
            self._resync = False
            return {"op": STATE_OP, "state": encode_probe_state(self._state())}
        if not self._queued:
            return None
        outcomes, self._queued = self._queued, []
        return encode_outcomes(outcomes)

    async def run(self, channel: Channel) -> None:
        """Send queued outcomes in order until the channel closes."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            message = self.next_message()
            if message is None:
                continue
            try:
                await channel.send(message)
            except ChannelClosedError:
                return


class SharedProbes:
    """The supervisor's health table and probes, and the feeds of its workers."""

    def __init__(
        self, graph: Graph, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.graph = graph
        self.table = HealthTable(graph.clusters, clock)
        self._clock = clock
        self._feeds: list[ProbeFeed] = []
        self._group: anyio.abc.TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<SharedProbes feeds={len(self._feeds)} {self.table!r}>"

    def feed(self) -> ProbeFeed:
        """Create the feed of one worker slot."""
        feed = ProbeFeed(self.state)
        self._feeds.append(feed)
        return feed

    def state(self) -> list[EndpointProbeState]:
        """Return the active-check state of every endpoint of the graph in force."""
        return capture_probe_state(self.table)

    def start(self, group: anyio.abc.TaskGroup) -> None:
        """Start probing the graph in force in `group`."""
        self._group = group
        self._start_loops()

    def install(self, graph: Graph) -> None:
        """Probe `graph` from now on; kept endpoints keep their state."""
        table = HealthTable(graph.clusters, self._clock)
        table.carry_over(self.table)
        self.stop()
        self.graph, self.table = graph, table
        self._start_loops()

    def stop(self) -> None:
        """Stop the probes of the graph in force."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

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
                feed.push(outcome)

        async def probe() -> None:
            with scope:
                await run_active_checks(graph, table, on_outcome=forward)

        self._group.start_soon(probe)
