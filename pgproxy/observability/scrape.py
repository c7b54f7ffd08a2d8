"""/metrics off the event loop: copy the state on the loop, format it in a thread.

Invariants:
- The caller takes the inputs on the event loop, in one synchronous step, so
  they are consistent: a `Snapshot` (`Metrics.snapshot` copies every counter)
  and a `ServerState` of copied values. The rendering thread reads only these
  copies, never a dict that the loop mutates.
- Renders run one at a time, in a worker thread, through a capacity limiter
  of one. Scrapes that arrive meanwhile wait on the loop, without holding a
  thread.

Formatting is what costs: with 300 clusters of 5 endpoints one render took
about 55 ms and the snapshot about 0.5 ms (2-core VM, Python 3.11). The
thread still needs the GIL. CPython makes a thread hand the GIL to a waiting
one after the switch interval (`sys.setswitchinterval`, 5 ms by default), so
the loop runs between those slices instead of stalling for the whole
render. While a render runs the interval is `RENDER_SWITCH_INTERVAL_S`,
because each wake-up of the loop may wait one interval. With 5 ms, a 1 ms
sleep on the loop woke a median 5.2 ms late during renders. With 1 ms, it
woke 1.2 ms late (`bench/metrics_stall.py`, same VM).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from pgproxy.observability.metrics import Snapshot

if TYPE_CHECKING:
    from pgproxy.observability.exposition import MetricsRenderer

RENDER_SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True)
class ServerState:
    """State of the serving process that is not in the data plane's snapshot.

    Build it from copies: it is read by the rendering thread.
    """

    config_hash: str = ""
    reloads: Mapping[str, int] = field(default_factory=dict)
    last_reload_time: float | None = None
    last_reload_ok: bool = True
    workers: int = 1
    worker_restarts: int = 0
    worker_pids: Mapping[str, int] = field(default_factory=dict)


class ThreadedRenderer:
    """Renders snapshots to Prometheus text in a worker thread, one at a time."""

    def __init__(self, limiter: anyio.CapacityLimiter | None = None) -> None:
        # Created on first use when None, because the supervisor builds its
        # renderer before the event loop runs.
        self._limiter = limiter
        self._renderer: MetricsRenderer | None = None

    def __repr__(self) -> str:
        loaded = self._renderer is not None
        return f"<ThreadedRenderer prometheus_client_loaded={loaded}>"

    async def render(self, snapshot: Snapshot, server: ServerState) -> bytes:
        """Format `snapshot` and `server` as Prometheus text in a worker thread.

        Both must be copies that the loop no longer changes.
        """
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(
            self._render, snapshot, server, limiter=self._limiter
        )

    def _render(self, snapshot: Snapshot, server: ServerState) -> bytes:
        # Runs in the worker thread, one call at a time.
        if self._renderer is None:
            # prometheus-client costs about 12 MiB of memory and 40 ms to
            # import (2-core VM), so only a process that serves /metrics
            # imports it, and here, off the loop.
            from pgproxy.observability.exposition import MetricsRenderer

            self._renderer = MetricsRenderer()
        # The interval is process-wide. Renders run one at a time, so each
        # restores the value that was in force before it.
        previous = sys.getswitchinterval()
        sys.setswitchinterval(RENDER_SWITCH_INTERVAL_S)
        try:
            return self._renderer.render(snapshot, server)
        finally:
            sys.setswitchinterval(previous)
