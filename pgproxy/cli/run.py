"""`pgproxy run CONFIG`: serve the config until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import anyio
import typer

from pgproxy.errors import ConfigError
from pgproxy.graph.load import load_graph
from pgproxy.graph.types import Graph
from pgproxy.observability.logging import setup_logging
from pgproxy.server.listeners import BindError, BoundListener, bind_listeners
from pgproxy.server.runtime import serve
from pgproxy.server.signals import ShutdownSignals

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
) -> None:
    """Serve the config until SIGTERM or SIGINT, then drain and exit 0."""
    if log_level.upper() not in LOG_LEVELS:
        raise typer.BadParameter(
            f"expected one of {', '.join(LOG_LEVELS)}", param_hint="--log-level"
        )
    setup_logging(log_level)
    try:
        loaded = load_graph(config)
    except ConfigError as exc:
        logger.error("invalid config: %s", exc)
        raise typer.Exit(1) from None
    for diagnostic in loaded.diagnostics:
        logger.warning("%s", diagnostic.render())
    try:
        listeners = bind_listeners(loaded.graph)
    except BindError as exc:
        logger.error("%s", exc)
        raise typer.Exit(1) from None
    run_until_signal(loaded.graph, listeners)


def run_until_signal(graph: Graph, listeners: list[BoundListener]) -> None:
    """Run the event loop (uvloop when installed) serving `graph`."""

    async def main() -> None:
        signals = ShutdownSignals()
        async with anyio.create_task_group() as group:
            group.start_soon(signals.receive)
            await serve(
                graph,
                shutdown_trigger=signals.wait,
                force_trigger=signals.forced.wait,
                listeners=listeners,
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
