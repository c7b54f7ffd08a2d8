"""The process runtime of `pgproxy run`: serve a graph until the shutdown trigger fires.

Lifecycle, one INFO line per stage: every listener is bound before anything
is served (a bind failure stops startup with one line), then each listener
logs `listener "NAME" listening on HOST:PORT` and the process logs
`pgproxy ready`. On shutdown: /healthz turns 503, serving goes on for
shutdown_delay, then the process stops accepting, drains in-flight requests
for up to drain_timeout, aborts what is left, closes idle upstream
connections, and logs `pgproxy stopped`.

anyio structures the process (task group, signals, health probes); the data
plane runs on asyncio Protocols of the same event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.lowlevel

from pgproxy.graph.types import Graph
from pgproxy.health.reports import ReportingHealthTable
from pgproxy.health.shared import apply_ejections, restore_probe_state
from pgproxy.health.state import HealthTable
from pgproxy.observability.access import AccessLog
from pgproxy.observability.throttle import flush_failure_lines
from pgproxy.proxy.service import ProxyService
from pgproxy.server.listeners import BoundListener, bind_listeners
from pgproxy.server.operations import Operations, OperationsSettings

logger = logging.getLogger(__name__)

ShutdownTrigger = Callable[[], Awaitable[object]]


async def serve(
    graph: Graph,
    *,
    shutdown_trigger: ShutdownTrigger,
    listeners: Sequence[BoundListener] | None = None,
    force_trigger: ShutdownTrigger | None = None,
    on_ready: Callable[[ProxyService, Sequence[BoundListener]], None] | None = None,
    operations: OperationsSettings | None = None,
) -> None:
    """Serve `graph` until `shutdown_trigger` returns, then shut down in stages.

    `listeners` are sockets bound beforehand (bound here when None).
    `force_trigger`, when it returns during the drain, cuts the drain short.
    `on_ready` is called once every listener accepts connections.
    `operations` turns on metrics, reloads and the admin listener; without
    it the graph is served as it is, with health probes only.
    """
    bound = list(listeners) if listeners is not None else bind_listeners(graph)
    loop = asyncio.get_running_loop()
    health = _health_table(graph, operations)
    if operations is not None:
        # Before the first accept, so a worker never sends to an endpoint
        # that its supervisor already found down or ejected.
        restore_probe_state(health, operations.probe_state)
        apply_ejections(health, operations.ejections)
    service = ProxyService(graph, health, AccessLog(graph.server.access_log))
    servers: dict[str, asyncio.Server] = {}
    for item in bound:
        server = await loop.create_server(
            # TLS runs in the protocol, so handshakes count against the limits.
            service.protocol_factory(item.listener, item.ssl_context),
            sock=item.sock,
        )
        servers[item.listener.name] = server
        logger.info(
            'listener "%s" listening on %s', item.listener.name, item.describe()
        )
    contexts = {
        item.listener.name: item.ssl_context
        for item in bound
        if item.ssl_context is not None
    }
    ops = Operations(operations, service, servers, contexts) if operations else None
    async with anyio.create_task_group() as group:
        stop_probes = anyio.Event()
        if ops is None:
            group.start_soon(_run_health, graph, health, stop_probes)
        else:
            await group.start(ops.run)
        logger.info("pgproxy ready")
        if on_ready is not None:
            on_ready(service, bound)
        await shutdown_trigger()
        if ops is not None:
            ops.begin_drain()
            # From the first signal on, as the supervisor of workers does.
            ops.reloader.stop()
        await _delay_shutdown(
            service.current.graph.server.shutdown_delay, force_trigger
        )
        # Servers as they are now: a reload may have added or closed some.
        await _shutdown(
            service,
            list(servers.values()),
            service.current.graph.server.drain_timeout,
            force_trigger,
        )
        stop_probes.set()
        group.cancel_scope.cancel()
    # The sweeper that reports left-out failure lines has stopped.
    flush_failure_lines(every_kind=True)
    logger.info("pgproxy stopped")


def _health_table(graph: Graph, operations: OperationsSettings | None) -> HealthTable:
    """Return the process's first health table; reloads create its successors."""
    if operations is not None and operations.report is not None:
        return ReportingHealthTable(graph.clusters, time.monotonic, operations.report)
    return HealthTable(graph.clusters, time.monotonic)


async def _run_health(graph: Graph, health: HealthTable, stop: anyio.Event) -> None:
    # Imported on first use: workers fed by the supervisor's probes never
    # need the probe client (httpcore and h11, about 2 MiB).
    from pgproxy.health.active import run_active_checks

    await run_active_checks(graph, health, stop=stop)


async def _delay_shutdown(delay: float, force_trigger: ShutdownTrigger | None) -> None:
    """Keep serving for `delay` seconds, or until the force trigger returns."""
    if delay <= 0:
        return
    logger.info("closing the listeners in %gs (shutdown_delay)", delay)
    with anyio.move_on_after(delay):
        if force_trigger is None:
            await anyio.sleep_forever()
        else:
            await force_trigger()
            logger.info("shutdown_delay cut short by a second signal")


async def _shutdown(
    service: ProxyService,
    servers: Sequence[asyncio.Server],
    drain_timeout: float,
    force_trigger: ShutdownTrigger | None,
) -> None:
    for server in servers:
        server.close()
    logger.info("stopped accepting new connections")
    busy = len(service.connections)
    logger.info("draining %d client connections (up to %gs)", busy, drain_timeout)
    service.start_draining()
    async with anyio.create_task_group() as group:
        if force_trigger is not None:
            group.start_soon(_cancel_when, force_trigger, group.cancel_scope)
        with anyio.move_on_after(drain_timeout) as timeout:
            await service.wait_closed()
        group.cancel_scope.cancel()
    # A drain that force_trigger cut short ends before its timeout.
    flag = "drain_timeout" if timeout.cancelled_caught else "drain_cancelled"
    aborted = service.abort_all(flag)
    if aborted:
        logger.info("cancelled %d connections still busy after the drain", aborted)
    closed = service.pools.close_idle()
    logger.info("closed %d idle upstream connections", closed)
    # Let transports finish closing before the loop stops.
    await anyio.lowlevel.checkpoint()


async def _cancel_when(trigger: ShutdownTrigger, scope: anyio.CancelScope) -> None:
    await trigger()
    scope.cancel()


def event_loop_options() -> dict[str, bool]:
    """Return anyio's asyncio options, using uvloop when it imports."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}
