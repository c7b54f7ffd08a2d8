"""/metrics and /status of the supervisor, merged from every worker.

Invariant: each scrape asks every worker for a snapshot over its control
channel and waits up to `REQUEST_TIMEOUT` seconds for the replies. A worker
that does not reply counts with its last snapshot. /metrics adds the
counters of workers that exited, so totals do not go back when a worker is
replaced. Passive ejections are counted by the supervisor, which decides
them: once per ejection, whatever the number of workers.
"""

from __future__ import annotations

from typing import Any

import anyio

from pgproxy.observability.metrics import Snapshot, merge_snapshots
from pgproxy.observability.scrape import ServerState, ThreadedRenderer
from pgproxy.server.control import Message
from pgproxy.server.reload import ReloadHistory
from pgproxy.server.slots import WorkerSlot
from pgproxy.server.status import merge_health, overlay_passive, status_document
from pgproxy.server.supervisor_health import SharedHealth

REQUEST_TIMEOUT = 5.0  # seconds a worker has to reply to a snapshot request


class SupervisorMetrics:
    """The admin sources of `Supervisor`: merged /metrics and /status."""

    # Set by `Supervisor.__init__`.
    count: int
    slots: list[WorkerSlot]
    history: ReloadHistory
    draining: bool
    retired: Snapshot
    health: SharedHealth
    _renderer: ThreadedRenderer

    async def _gather(self) -> dict[int, Message]:
        replies: dict[int, Message] = {}

        async def ask(slot: WorkerSlot) -> None:
            reply = await slot.request({"op": "snapshot"}, REQUEST_TIMEOUT)
            if reply is not None:
                replies[slot.index] = reply
                slot.last_snapshot = Snapshot.from_wire(reply["metrics"])

        async with anyio.create_task_group() as group:
            for slot in self.slots:
                group.start_soon(ask, slot)
        return replies

    async def metrics(self) -> bytes:
        """Return the Prometheus text of every worker, merged; formatted in a thread."""
        await self._gather()
        live = [slot.last_snapshot for slot in self.slots if slot.last_snapshot]
        # A new snapshot, and copies of the state, for the rendering thread.
        decided = Snapshot(processes=0, ejections=dict(self.health.ejection_counts))
        merged = merge_snapshots([self.retired, *live, decided])
        server = ServerState(
            config_hash=self.history.config_hash,
            reloads=dict(self.history.counts),
            last_reload_time=self.history.last_attempt_at,
            last_reload_ok=self.history.last_outcome != "failure",
            workers=self.count,
            worker_restarts=sum(slot.restarts for slot in self.slots),
            worker_pids={
                str(slot.index): slot.process.pid
                for slot in self.slots
                if slot.process is not None
            },
        )
        return await self._renderer.render(merged, server)

    async def status(self) -> dict[str, Any]:
        """Return the /status document with every worker's endpoint health."""
        replies = await self._gather()
        health = {str(index): reply["health"] for index, reply in replies.items()}
        clusters = merge_health(health)
        overlay_passive(clusters, self.health.table.snapshot())
        return status_document(
            self.history.as_dict(),
            clusters,
            [slot.describe() for slot in self.slots],
            draining=self.draining,
            monotonic_now=self.health.table.now(),
        )
