"""Entry point of a worker process: `python -m pgproxy.server.worker_main`.

The supervisor starts it with `PGPROXY_WORKER` set (see
`pgproxy.server.worker`). The worker unpickles the graph from its `start`
message, serves it on the inherited listening sockets, and replies
to requests on the control channel. SIGTERM drains it like a single-process
pgproxy; so does the channel closing, which means the supervisor is gone.
SIGHUP is ignored.

A worker sends no health probes and decides no ejections: it records the
outcomes of the supervisor's probes, reports the outcomes of its traffic
(`ReportSender`), takes over the ejections the supervisor decides, and logs
the changes all this causes at DEBUG only, because the supervisor logs them
once for all workers.
"""

from __future__ import annotations

import signal

# `pkill -HUP pgproxy` and `systemctl kill -s HUP` reach the workers too, and
# SIGHUP's default action would end them: the supervisor runs reloads, so a
# worker ignores SIGHUP, from before the slow imports below.
signal.signal(signal.SIGHUP, signal.SIG_IGN)
# ruff: noqa: E402 (the imports below come after that call on purpose)

import logging
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import anyio

from pgproxy.errors import ConfigError
from pgproxy.graph.types import Listener
from pgproxy.health.passive import log_applied_transition
from pgproxy.health.reports import OutcomeReport
from pgproxy.health.shared import (
    Ejection,
    EndpointProbeState,
    ProbeOutcome,
    apply_ejections,
    apply_outcomes,
    restore_probe_state,
)
from pgproxy.health.state import Transition
from pgproxy.observability.logging import setup_logging
from pgproxy.observability.metrics import Snapshot
from pgproxy.server.allocator import tune_allocator
from pgproxy.server.control import Channel, ChannelClosedError
from pgproxy.server.listeners import BindError, BoundListener, server_ssl_context
from pgproxy.server.loading import decode_loaded
from pgproxy.server.operations import Operations, OperationsSettings
from pgproxy.server.reload import describe_config_error
from pgproxy.server.runtime import event_loop_options, serve
from pgproxy.server.signals import ShutdownSignals
from pgproxy.server.worker import (
    ReportSender,
    WorkerSettings,
    receive_start,
    serve_control,
)

logger = logging.getLogger("pgproxy.worker")


class WorkerRuntime:
    """The `WorkerHost` of one worker process."""

    def __init__(self, settings: WorkerSettings, sockets: dict[str, socket.socket]):
        self.settings = settings
        self.sockets = sockets  # listening sockets by listener name
        self.shutdown = anyio.Event()
        self.operations: Operations | None = None

    def attach(self, operations: Operations) -> None:
        """Connect the control requests to the serving process."""
        self.operations = operations

    def bind(self, listener: Listener) -> BoundListener:
        """Pair a listener with the socket the supervisor passed for it."""
        sock = self.sockets.get(listener.name)
        if sock is None:
            raise BindError(f'no socket was passed for listener "{listener.name}"')
        sock.setblocking(False)
        return BoundListener(listener, sock, server_ssl_context(listener))

    def metrics_snapshot(self) -> dict[str, Any]:
        """Return the metrics snapshot in wire form."""
        if self.operations is None:
            return Snapshot().to_wire()
        return self.operations.metrics.snapshot().to_wire()

    def health_snapshot(self) -> Mapping[str, Any]:
        """Return the health table snapshot of the graph in force."""
        if self.operations is None:
            return {}
        return self.operations.state.health.snapshot()

    async def reload(
        self, payload: bytes, added: Mapping[str, socket.socket]
    ) -> tuple[bool, str | None, str | None]:
        """Install the graph the supervisor loaded."""
        if self.operations is None:
            return False, None, "the worker is not serving yet"
        self.sockets.update(added)
        outcome = await self.operations.reloader.reload("supervisor", payload=payload)
        return outcome.ok, outcome.config_hash, outcome.error

    def apply_probe_outcomes(self, outcomes: list[ProbeOutcome]) -> None:
        """Record the supervisor's probe outcomes in the health table in force."""
        if self.operations is not None:
            table = self.operations.state.health
            _log_applied(apply_outcomes(table, outcomes))

    def restore_probe_state(self, states: list[EndpointProbeState]) -> None:
        """Take over the supervisor's active-check state."""
        if self.operations is not None:
            table = self.operations.state.health
            _log_applied(restore_probe_state(table, states))

    def apply_ejections(self, ejections: list[Ejection]) -> None:
        """Take over ejections that the supervisor started or ended."""
        if self.operations is not None:
            table = self.operations.state.health
            _log_applied(apply_ejections(table, ejections))

    def request_shutdown(self) -> None:
        """Start draining."""
        self.shutdown.set()


def _log_applied(transitions: list[Transition]) -> None:
    for transition in transitions:
        log_applied_transition(transition)


async def run_worker(settings: WorkerSettings) -> int:
    """Serve as one worker until SIGTERM or the supervisor goes away."""
    channel = await Channel.open(settings.control_fd)
    try:
        start = await receive_start(channel)
        loaded = decode_loaded(start.payload, settings.config)
    except ChannelClosedError as error:
        logger.error("no start message from the supervisor: %s", error)
        return 1
    except ConfigError as error:
        message = describe_config_error(settings.config, error)
        logger.error("invalid config: %s", message)
        return 1
    runtime = WorkerRuntime(settings, settings.listener_sockets())
    try:
        listeners = [runtime.bind(item) for item in loaded.graph.listeners.values()]
    except BindError as error:
        # The supervisor checked the files before it started the workers,
        # so they changed since.
        logger.error("%s", error)
        return 1
    signals = ShutdownSignals()
    shared = start.probe_state is not None
    report = OutcomeReport() if shared else None

    async def stop() -> None:
        async with anyio.create_task_group() as group:

            async def when(event: anyio.Event) -> None:
                await event.wait()
                group.cancel_scope.cancel()

            group.start_soon(when, signals.requested)
            group.start_soon(when, runtime.shutdown)

    async with anyio.create_task_group() as group:

        def on_start(operations: Operations) -> None:
            runtime.attach(operations)
            group.start_soon(serve_control, channel, runtime)
            if report is not None:
                group.start_soon(ReportSender(report).run, channel)

        group.start_soon(signals.receive)
        await serve(
            loaded.graph,
            shutdown_trigger=stop,
            force_trigger=signals.forced.wait,
            listeners=listeners,
            operations=OperationsSettings(
                config_path=settings.config,
                loaded=loaded,
                bind=runtime.bind,
                sighup=False,
                log_outcome=False,
                on_start=on_start,
                shared_probes=shared,
                probe_state=tuple(start.probe_state or ()),
                ejections=tuple(start.ejections),
                report=report,
            ),
        )
        group.cancel_scope.cancel()
    return 0


class _WorkerPrefix(logging.Filter):
    """Demotes per-worker start-up lines that the supervisor logs once."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno == logging.INFO and (
            "listening on" in message or message == "pgproxy ready"
        ):
            return False
        return True


def main() -> None:
    """Run one worker process (started by the supervisor only)."""
    try:
        settings = WorkerSettings.from_environment()
    except (KeyError, ValueError):
        sys.stderr.write("pgproxy worker: started without PGPROXY_WORKER settings\n")
        sys.exit(2)
    setup_logging(settings.log_level)
    tune_allocator()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerPrefix())
    started = time.monotonic()
    code = anyio.run(
        run_worker, settings, backend="asyncio", backend_options=event_loop_options()
    )
    logger.debug("worker %d ran %.1fs", settings.index, time.monotonic() - started)
    sys.exit(code)


if __name__ == "__main__":
    main()
