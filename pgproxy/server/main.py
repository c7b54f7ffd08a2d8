"""The serving process of `pgproxy run`: `python -m pgproxy.server.main`.

`pgproxy run` checks its options, then replaces itself (exec, same pid) with
this module. The process that serves therefore imports neither the
command-line stack (typer, click) nor pydantic. It loads the config through
the loader child (`pgproxy.server.loading`) and serves the graph it returns. With
`[server] workers` above one it becomes the supervisor of that many worker
processes; otherwise it serves itself, and SIGHUP or `--watch` reloads.

Exit codes: 0 after a clean stop, 1 when the config is invalid or a
listener cannot be bound.
"""

from __future__ import annotations

from pgproxy.server.sighup import hold_sighup

# SIGHUP's default action ends the process. Until the reload handler is
# installed it is held pending (usually since `pgproxy run` started, across
# exec), so an early one causes a reload right after start-up.
hold_sighup()
# ruff: noqa: E402 (the imports below come after that call on purpose)

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator

import anyio

from pgproxy import compiled
from pgproxy.errors import ConfigError
from pgproxy.graph.types import Listener, LoadedGraph
from pgproxy.observability.logging import LOG_LEVELS, setup_logging
from pgproxy.proxy.fdlimit import raise_open_file_limit
from pgproxy.server.admin import AdminServer
from pgproxy.server.allocator import tune_allocator
from pgproxy.server.listeners import (
    BindError,
    BoundListener,
    bind_listeners,
    bind_socket,
    check_ca_files,
    server_ssl_context,
)
from pgproxy.server.loading import load_config
from pgproxy.server.operations import OperationsSettings
from pgproxy.server.reload import describe_config_error
from pgproxy.server.runtime import event_loop_options, serve
from pgproxy.server.signals import ShutdownSignals
from pgproxy.server.worker import oversized_message, payload_fits
from pgproxy.server.workers import Supervisor, worker_count

logger = logging.getLogger("pgproxy.run")


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    """Parse the options `pgproxy run` passes on (it has checked them already)."""
    parser = argparse.ArgumentParser(prog="pgproxy run")
    parser.add_argument("config")
    parser.add_argument("--log-level", default="INFO", choices=LOG_LEVELS)
    parser.add_argument("--watch", action="store_true")
    return parser.parse_args(argv)


def open_standard_streams() -> None:
    """Open /dev/null on each of descriptors 0, 1 and 2 that is closed.

    A process manager or shell may start pgproxy with stdin, stdout or stderr
    closed (`<&-`). The next socket would then get that number: libuv aborts
    when it closes a descriptor below 3, and worker processes, which inherit
    0-2, would write their logs into a listening socket. Python also leaves
    sys.stdout or sys.stderr None for a closed descriptor, which the logging
    setup cannot use.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
    if sys.stdout is None:
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(
            2,
            "w",
            buffering=1,
            encoding="utf-8",
            errors="backslashreplace",
            closefd=False,
        )


def log_request_path() -> None:
    """Log whether the request path runs compiled, and warn about a stale build."""
    if compiled.STALE_REASON is not None:
        logger.warning(
            "running the request path from its Python source, which is slower, "
            "because %s; reinstall pgproxy (`pip install -e .` in a checkout) "
            "to compile it again",
            compiled.STALE_REASON,
        )
    elif compiled.C_STALE_REASONS:
        for name, reason in compiled.C_STALE_REASONS.items():
            logger.warning(
                "running the %s in Python, which is slower, because %s; "
                "reinstall pgproxy (`pip install -e .` in a checkout) to build "
                "%s again",
                compiled.C_MODULES[name],
                reason,
                name,
            )
    elif compiled.REQUEST_PATH != "compiled":
        logger.info("request path: %s", compiled.REQUEST_PATH)
    else:
        logger.debug("request path: compiled")


class StopRequested(Exception):
    """SIGTERM or SIGINT arrived before the process started serving."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise StopRequested(signal.Signals(signum).name)


@contextlib.contextmanager
def _stop_raises() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into StopRequested inside the block.

    The first load waits for the loader child. With the default actions, a
    SIGTERM would end this process and leave the child running on its own:
    for seconds with a large config, and without end when it is stopped.
    Raised as an exception, the signal makes the wait kill and reap the
    child first. A signal that was ignored when the process started stays
    ignored.
    """
    previous = {
        signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(signum, _raise_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def run(config_path: str, log_level: str = "INFO", watch: bool = False) -> int:
    """Load the config, bind, serve until SIGTERM or SIGINT; return the exit code."""
    tune_allocator()
    setup_logging(log_level)
    raise_open_file_limit()
    log_request_path()
    try:
        with _stop_raises():
            loaded, payload = load_config(config_path)
    except ConfigError as exc:
        logger.error("invalid config: %s", describe_config_error(config_path, exc))
        return 1
    except StopRequested as stop:
        logger.info("received %s while loading the config; stopped", stop)
        return 0
    for diagnostic in loaded.diagnostics:
        logger.warning("%s", diagnostic.render())

    count = worker_count(loaded.graph.server.workers)
    if count > 1 and not payload_fits(payload):
        logger.error("%s", oversized_message(config_path, payload))
        return 1
    if count > 1:
        supervisor = Supervisor(
            config_path, loaded, payload, count, log_level=log_level
        )
        code: int = anyio.run(
            supervisor.run,
            watch,
            backend="asyncio",
            backend_options=event_loop_options(),
        )
        return code

    try:
        check_ca_files(loaded.graph.clusters.values())
        listeners = bind_listeners(loaded.graph)
        admin = _bind_admin(loaded)
    except (BindError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    settings = OperationsSettings(
        config_path=config_path,
        loaded=loaded,
        bind=bind_listener,
        admin=admin,
        watch=watch,
    )
    run_until_signal(loaded, listeners, settings)
    return 0


def _bind_admin(loaded: LoadedGraph) -> AdminServer | None:
    address = loaded.graph.server.admin
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
            f"{listener.settings.address}: {exc.strerror or exc}"
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


def main(argv: list[str] | None = None) -> None:
    """Run `pgproxy run` with the options it passed on."""
    open_standard_streams()
    options = parse_arguments(sys.argv[1:] if argv is None else argv)
    sys.exit(run(options.config, options.log_level, options.watch))


if __name__ == "__main__":
    main()
