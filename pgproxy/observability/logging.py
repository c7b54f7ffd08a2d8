"""Logging setup for the pgproxy process.

Process logs go to stderr: through rich when stderr is a terminal, otherwise
one plain `LEVEL logger: message` line per record, which is what log
collectors and tests read. Access records (logger `pgproxy.access`) go to
stdout as bare lines, at INFO whatever the process log level is.
"""

from __future__ import annotations

import logging
import sys

ACCESS_LOGGER = "pgproxy.access"
PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Route process logs to stderr at `level` and access records to stdout."""
    root = logging.getLogger()
    for old_handler in list(root.handlers):
        root.removeHandler(old_handler)
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())

    access = logging.getLogger(ACCESS_LOGGER)
    for old in list(access.handlers):
        access.removeHandler(old)
    access_handler = logging.StreamHandler(sys.stdout)
    access_handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(access_handler)
    access.setLevel(logging.INFO)
    access.propagate = False
