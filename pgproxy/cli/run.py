"""`pgproxy run CONFIG`: serve the config until SIGTERM or SIGINT.

With `[server] workers` above one, the process becomes a supervisor of that
many worker processes (see `pgproxy.server.workers`). Otherwise it serves
itself: SIGHUP reloads the config, and `--watch` reloads it when the file or
its folder changes.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated

import anyio
import typer

from pgproxy.errors import ConfigError
from pgproxy.graph.load import LoadedGraph
from pgproxy.graph.types import Listener
from pgproxy.observability.logging import setup_logging
from pgproxy.server.admin import AdminServer
from pgproxy.server.allocator import tune_allocator
from pgproxy.server.listeners import (
    BindError,
    BoundListener,
    bind_listeners,
    bind_socket,
    server_ssl_context,
)
from pgproxy.server.operations import OperationsSettings
from pgproxy.server.reload import describe_config_error, read_config
from pgproxy.server.runtime import serve
from pgproxy.server.signals import ShutdownSignals
from pgproxy.server.workers import Supervisor, worker_count

logger = logging.getLogger("pgproxy.run")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def run_command(
    config: Annotated[Path, typer.Argument(help="Config file (TOML).")],
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level", help="Process log level: DEBUG, INFO, WARNING or ERROR."
        ),
    ] = "INFO",
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Reload when the config file or its folder changes (polled "
            "every second, debounced).",
        ),
    ] = False,
) -> None:
    """Serve the config until SIGTERM or SIGINT, then drain and exit 0.

    SIGHUP reloads the config; an invalid one keeps the running config.
    """
    # SIGHUP's default action ends the process. It is ignored until the
    # reload handler is installed, so an early one is lost instead of fatal.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    tune_allocator()
    if log_level.upper() not in LOG_LEVELS:
        raise typer.BadParameter(
            f"expected one of {', '.join(LOG_LEVELS)}", param_hint="--log-level"
        )
    setup_logging(log_level)
    try:
        loaded, source = read_config(str(config))
    except ConfigError as exc:
        logger.error("invalid config: %s", describe_config_error(str(config), exc))
        raise typer.Exit(1) from None
    for diagnostic in loaded.diagnostics:
        logger.warning("%s", diagnostic.render())

    count = worker_count(loaded.graph.config.server.workers)
    if count > 1:
        supervisor = Supervisor(
            str(config), loaded, source, count, log_level=log_level.upper()
        )
        code = anyio.run(
            supervisor.run,
            watch,
            backend="asyncio",
            backend_options=event_loop_options(),
        )
        raise typer.Exit(code)

    try:
        listeners = bind_listeners(loaded.graph)
        admin = _bind_admin(loaded)
    except (BindError, OSError) as exc:
        logger.error("%s", exc)
        raise typer.Exit(1) from None
    settings = OperationsSettings(
        config_path=str(config),
        loaded=loaded,
        bind=bind_listener,
        admin=admin,
        watch=watch,
    )
    run_until_signal(loaded, listeners, settings)


def _bind_admin(loaded: LoadedGraph) -> AdminServer | None:
    address = loaded.graph.config.server.admin
    if address is None:
        return None
    admin = AdminServer(address)
    try:
        bound = admin.bind()
    except OSError as exc:
        raise BindError(
            f"cannot bind the admin listener to {address}: {exc.strerror or exc}"
        ) from None
    logger.info("admin listener listening on %s", bound)
    return admin


def bind_listener(listener: Listener) -> BoundListener:
    """Bind a listener that a reload added; raises BindError naming the address."""
    context = server_ssl_context(listener)
    try:
        sock = bind_socket(listener.host, listener.port)
    except OSError as exc:
        raise BindError(
            f'cannot bind listener "{listener.name}" to '
            f"{listener.config.address}: {exc.strerror or exc}"
        ) from None
    return BoundListener(listener, sock, context)


def run_until_signal(
    loaded: LoadedGraph,
    listeners: list[BoundListener],
    settings: OperationsSettings | None = None,
) -> None:
    """Run the event loop (uvloop when installed) serving `loaded.graph`."""

    async def main() -> None:
        signals = ShutdownSignals()
        async with anyio.create_task_group() as group:
            group.start_soon(signals.receive)
            await serve(
                loaded.graph,
                shutdown_trigger=signals.wait,
                force_trigger=signals.forced.wait,
                listeners=listeners,
                operations=settings,
            )
            group.cancel_scope.cancel()

    anyio.run(main, backend="asyncio", backend_options=event_loop_options())


def event_loop_options() -> dict[str, bool]:
    """Return anyio's asyncio options, using uvloop when it imports."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}
