"""The operational side of one serving process: metrics, reload, admin, probes.

`Operations` is created once the proxy service serves. It binds the metrics
to every graph the service installs, restarts the health probes for each new
graph, reloads on SIGHUP (and on file changes with `--watch`), and serves
the admin listener. A worker process uses it without SIGHUP or admin: its
supervisor sends reloads and scrapes over the control channel, and with
`shared_probes` it runs no probes of its own (the supervisor sends their
outcomes) and decides no ejections (the supervisor sends them), but still
ends ejections on time.

Draining: `begin_drain` turns /healthz to 503 and logs it. The runtime
then serves for `[server] shutdown_delay` more, so that an outer load
balancer polling /healthz gets the 503 before connections are refused,
and only then closes its listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from pgproxy.graph.types import Graph, LoadedGraph
from pgproxy.health.passive import log_applied_transition, run_transition_sweeper
from pgproxy.health.reports import OutcomeReport
from pgproxy.health.shared import Ejection, EndpointProbeState
from pgproxy.health.state import HealthTable
from pgproxy.observability.metrics import Metrics
from pgproxy.observability.scrape import ServerState, ThreadedRenderer
from pgproxy.proxy.service import ProxyService
from pgproxy.server.reload import Reloader, ReloadHistory
from pgproxy.server.running import BindListener, ServiceState
from pgproxy.server.signals import CoalescedTrigger, open_reload_receiver
from pgproxy.server.status import merge_health, status_document
from pgproxy.server.watch import watch_config

if TYPE_CHECKING:
    from pgproxy.server.admin import AdminServer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperationsSettings:
    """Settings of the operational side of a process, for `serve`.

    `admin` is an admin listener already bound (or None); `bind` binds the
    listeners that a reload adds. A worker process sets `sighup`, `watch` and
    `log_outcome` to False, because its supervisor does those. It sets
    `shared_probes` when its supervisor decides health for it, `probe_state`
    and `ejections` to the supervisor's state at the worker's start, and
    `report` to the report its health tables add traffic outcomes to.
    """

    config_path: str
    loaded: LoadedGraph
    bind: BindListener
    admin: AdminServer | None = None
    sighup: bool = True
    watch: bool = False
    log_outcome: bool = True
    on_start: Callable[[Operations], None] | None = None
    shared_probes: bool = False
    probe_state: tuple[EndpointProbeState, ...] = ()
    ejections: tuple[Ejection, ...] = ()
    report: OutcomeReport | None = None


class Operations:
    """Metrics, reloads, probes and the admin listener of one process."""

    def __init__(
        self,
        settings: OperationsSettings,
        service: ProxyService,
        servers: dict[str, asyncio.Server],
        contexts: dict[str, ssl.SSLContext] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        service.metrics = self.metrics
        self.state = ServiceState(
            service, self.metrics, settings.bind, servers, dict(contexts or {})
        )
        self.history = ReloadHistory(settings.config_path, settings.loaded.config_hash)
        self.reloader = Reloader(
            settings.config_path,
            self.state,
            self.history,
            log_outcome=settings.log_outcome,
        )
        self.draining = False
        self._renderer = ThreadedRenderer()
        self._probes: anyio.CancelScope | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._bind_metrics(service.current.graph)
        self.state.on_install.append(self._installed)

    def __repr__(self) -> str:
        return f"<Operations {self.history.config_path} draining={self.draining}>"

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run probes, the admin listener, SIGHUP and file watching until cancelled.

        With `TaskGroup.start`, it returns once SIGHUP is handled. A SIGHUP
        held since start-up then causes one reload right away.
        """
        settings = self.settings
        with contextlib.ExitStack() as stack:
            signals = None
            if settings.sighup:
                signals = stack.enter_context(open_reload_receiver(signal.SIGHUP))
            async with anyio.create_task_group() as group:
                self._group = group
                self._start_probes(self.state.graph, self.state.health)
                if settings.admin is not None:
                    # The caller built settings.admin, so this import is free;
                    # workers, which have no admin listener, never load h11.
                    from pgproxy.server.admin import AdminSources

                    sources = AdminSources(
                        self.metrics_text, self.status, lambda: self.draining
                    )
                    group.start_soon(settings.admin.serve, sources)
                if signals is not None:
                    group.start_soon(self._receive_sighup, signals)
                if settings.watch:
                    group.start_soon(
                        watch_config,
                        settings.config_path,
                        lambda: self.reloader.reload("file changed"),
                    )
                if settings.on_start is not None:
                    settings.on_start(self)
                task_status.started()

    def begin_drain(self) -> None:
        """Make /healthz return 503; call it before the listeners close."""
        self.draining = True
        if self.settings.admin is not None:
            logger.info("draining: admin /healthz returns 503 from now on")

    def stop_probes(self) -> None:
        """Stop the health probes of the graph in force."""
        if self._probes is not None:
            self._probes.cancel()
            self._probes = None

    async def metrics_text(self) -> bytes:
        """Return the Prometheus text of this process, formatted off the loop."""
        # Copies are taken in one synchronous step on the loop, and the
        # rendering thread reads nothing else.
        snapshot = self.metrics.snapshot()
        server = ServerState(
            config_hash=self.history.config_hash,
            reloads=dict(self.history.counts),
            last_reload_time=self.history.last_attempt_at,
            last_reload_ok=self.history.last_outcome != "failure",
        )
        return await self._renderer.render(snapshot, server)

    async def status(self) -> dict[str, Any]:
        """Return the /status document of this process."""
        snapshot = self.metrics.snapshot()
        worker = {
            "id": 0,
            "pid": os.getpid(),
            "ready": True,
            "restarts": 0,
            "connections": sum(counts[0] for counts in snapshot.connections.values()),
            "requests": sum(
                sum(stats.statuses.values()) for stats in snapshot.requests.values()
            ),
        }
        return status_document(
            self.history.as_dict(),
            merge_health({"0": self.state.health.snapshot()}),
            [worker],
            draining=self.draining,
            monotonic_now=self.state.health.now(),
        )

    def _bind_metrics(self, graph: Graph) -> None:
        self.state.service.current.metrics = self.metrics.bind_graph(graph)

    def _installed(self, graph: Graph, health: HealthTable) -> None:
        self._bind_metrics(graph)
        self.stop_probes()
        self._start_probes(graph, health)

    def _start_probes(self, graph: Graph, health: HealthTable) -> None:
        if self._group is None:
            return
        scope = anyio.CancelScope()
        self._probes = scope
        shared = self.settings.shared_probes

        async def probe() -> None:
            with scope:
                if shared:
                    await run_transition_sweeper(health, log=log_applied_transition)
                else:
                    # Imported here, so workers fed by the supervisor never
                    # load the probe client (httpcore and h11, about 2 MiB).
                    from pgproxy.health.active import run_active_checks

                    await run_active_checks(graph, health)

        self._group.start_soon(probe)

    async def _receive_sighup(self, signals: AsyncIterator[int]) -> None:
        async def reload() -> None:
            started = time.monotonic()
            await self.reloader.reload("SIGHUP")
            logger.debug("reload took %.3fs", time.monotonic() - started)

        trigger = CoalescedTrigger(reload)
        async with anyio.create_task_group() as group:
            group.start_soon(trigger.run)
            async for _ in signals:
                trigger.request()
