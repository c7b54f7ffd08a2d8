"""`pgproxy run CONFIG`: serve the config until SIGTERM or SIGINT.

The command checks its options and then replaces itself (exec, so the pid
stays the same for process managers) with `python -m pgproxy.server.main`,
the serving process: it never imports typer, click or pydantic, which keeps
each serving process about 20 MiB smaller. See `pgproxy.server.main` for
what it does and its exit codes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from pgproxy.observability.logging import LOG_LEVELS
from pgproxy.server.loading import package_environment
from pgproxy.server.sighup import hold_sighup

SERVE_MODULE = "pgproxy.server.main"


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
    # SIGHUP's default action ends the process. Held pending now (the entry
    # point usually did it already), it stays so across exec until the
    # serving process handles it.
    hold_sighup()
    level = log_level.upper()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(
            f"expected one of {', '.join(LOG_LEVELS)}", param_hint="--log-level"
        )
    # "--" keeps a path such as "-edge.toml" from being read as an option.
    argv = ["--log-level", level, *(["--watch"] if watch else []), "--", str(config)]
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None when the process manager closed it
            stream.flush()
    os.execve(
        sys.executable,
        [sys.executable, "-m", SERVE_MODULE, *argv],
        package_environment(),
    )
