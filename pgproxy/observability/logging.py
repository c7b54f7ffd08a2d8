"""Logging setup for the pgproxy process.

Process logs go to stderr: through rich when stderr is a terminal, otherwise
one plain `LEVEL logger: message` line per record, which is what log
collectors and tests read. Access records (logger `pgproxy.access`) go to
stdout as bare lines, at INFO whatever the process log level is.

Access lines are buffered and written together once per event loop
iteration (or sooner when the buffer grows large), so a busy loop makes one
write(2) for many requests.

Invariants: each write ends at a line end and stays within PIPE_BUF unless
one line is longer, so worker processes sharing one stdout pipe do not mix
their lines. No line is lost on a clean exit: `logging.shutdown`, which runs
at interpreter exit, flushes every handler, and a line written with no
running loop is written at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Iterator
from typing import TextIO

ACCESS_LOGGER = "pgproxy.access"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"

# Lines queued before a flush is forced without waiting for the next iteration.
_MAX_PENDING_LINES = 512
# PIPE_BUF on Linux: a write to a pipe up to this size is never interleaved
# with other writers' bytes, so workers sharing stdout never split a line.
PIPE_ATOMIC_BYTES = 4096


class AccessLineHandler(logging.Handler):
    """Writes access lines to a stream, batched per event loop iteration."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._pending: list[str] = []
        # The loop a flush is scheduled on, or None when no flush is pending.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._guard = threading.Lock()
        self._failed = False

    def write_line(self, line: str) -> None:
        """Queue one line, to be written by the next loop iteration."""
        with self._guard:
            pending = self._pending
            pending.append(line)
            if len(pending) < _MAX_PENDING_LINES and self._schedule():
                return
        self.flush()

    def _schedule(self) -> bool:
        """Schedule a flush on the running loop, or return False if none runs.

        A flush scheduled on a loop that has stopped since would never run,
        so it counts as pending only while that loop is running.
        """
        loop = self._loop
        if loop is not None and loop.is_running():
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_soon(self.flush)
        self._loop = loop
        return True

    def emit(self, record: logging.LogRecord) -> None:
        """Queue a record logged through the logging module."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write_line(line)

    def flush(self) -> None:
        """Write every queued line with one write and flush the stream."""
        with self._guard:
            self._loop = None
            lines = self._pending
            if not lines:
                return
            self._pending = []
            try:
                for batch in _batches(lines):
                    self.stream.write(batch)
                    self.stream.flush()
            except (OSError, ValueError) as exc:
                # A closed or broken stdout must not stop the proxy. It is
                # logged once, because every later flush would fail the same way.
                if not self._failed:
                    self._failed = True
                    logging.getLogger(__name__).error(
                        "cannot write access log lines, dropping them: %s", exc
                    )


def _batches(lines: list[str]) -> Iterator[str]:
    """Yield the lines joined into writes of at most PIPE_ATOMIC_BYTES each.

    A longer line is a write of its own. Characters outside ASCII count
    twice, the most a latin-1 decoded character takes in UTF-8.
    """
    batch: list[str] = []
    size = 0
    for line in lines:
        length = (len(line) if line.isascii() else 2 * len(line)) + 1
        if batch and size + length > PIPE_ATOMIC_BYTES:
            batch.append("")
            yield "\n".join(batch)
            batch = []
            size = 0
        batch.append(line)
        size += length
    if batch:
        batch.append("")
        yield "\n".join(batch)


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
    access_handler = AccessLineHandler(sys.stdout)
    access_handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(access_handler)
    access.setLevel(logging.INFO)
    access.propagate = False
