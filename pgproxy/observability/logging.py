"""Logging setup for the pgproxy process.

Process logs go to stderr: through rich when stderr is a terminal, otherwise
one plain `LEVEL logger: message` line per record, which is what log
collectors and tests read. Access records (logger `pgproxy.access`) go to
stdout as bare lines, at INFO whatever the process log level is.

Access lines are buffered and handed to a writer thread once per event
loop iteration (or sooner when the buffer grows large), so a busy loop makes
one write(2) for many requests, and a stdout nobody reads cannot stall the
loop: lines are dropped and counted instead.

Invariants: each write ends at a line end and stays within PIPE_BUF unless
one line is longer, so worker processes sharing one stdout pipe do not mix
their lines. No line is lost on a clean exit while stdout is read:
`logging.shutdown`, which runs at interpreter exit, flushes every handler,
and a flush with no running loop waits until its lines are written. While
stdout is not read, only the first such wait lasts DRAIN_TIMEOUT: later ones
return at once until the writer thread writes again, so an exit (a flush,
then a close) takes at most DRAIN_TIMEOUT longer than with stdout read.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from typing import TextIO

from pgproxy.observability.batch import LineBatch

ACCESS_LOGGER = "pgproxy.access"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"

# Lines queued before a flush is forced without waiting for the next iteration.
MAX_PENDING_LINES = 512
# Flushes the writer thread may be behind before lines are dropped. A flush
# carries the lines of one loop iteration: one line each at low load, so
# about 1,000 lines; up to MAX_PENDING_LINES each when busy.
_MAX_QUEUED_FLUSHES = 1024
# How long a flush off the event loop (at exit) waits for the writer thread.
DRAIN_TIMEOUT = 2.0
# Seconds between two warnings about dropped lines.
_DROP_LOG_INTERVAL = 10.0
# PIPE_BUF on Linux: a write to a pipe up to this size is never interleaved
# with other writers' bytes, so workers sharing stdout never split a line.
PIPE_ATOMIC_BYTES = 4096


class AccessLineHandler(logging.Handler):
    """Writes access lines to a stream, batched per event loop iteration.

    The event loop never writes to the stream itself: a flush on the loop
    hands the batch to a writer thread through a bounded queue. A reader that
    stops reading (`pgproxy run | less`, a stalled log shipper) then fills
    the queue, and further lines are dropped and counted, instead of
    blocking the loop in write(2) until no request is served. A flush with
    no running loop waits, for up to DRAIN_TIMEOUT, until the thread has
    written everything queued, so lines written at exit are not lost.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        # Lines waiting for the next flush. While the batch's loop runs, the
        # event loop's thread may append to its lines without the lock, as
        # AccessLog.write does. That is safe because the flush that takes them
        # runs on that thread too, and no other thread writes access lines.
        self.batch = LineBatch()
        self._guard = threading.Lock()
        self._failed = False
        # Set when a wait for the writer thread timed out; cleared by the
        # thread after each write. While set, flushes off the loop do not wait.
        self._stalled = False
        self._queue: queue.Queue[list[str]] = queue.Queue(_MAX_QUEUED_FLUSHES)
        self._writer: threading.Thread | None = None
        self.dropped_lines = 0
        self._dropped_reported = 0
        self._drop_logged_at = -_DROP_LOG_INTERVAL

    def write_line(self, line: str) -> None:
        """Queue one line, to be written by the next loop iteration."""
        with self._guard:
            pending = self.batch.lines
            pending.append(line)
            if len(pending) < MAX_PENDING_LINES and self._schedule():
                return
        self.flush()

    def _schedule(self) -> bool:
        """Schedule a flush on the running loop, or return False if none runs.

        A flush scheduled on a loop that has stopped since would never run,
        so it counts as pending only while that loop is running.
        """
        loop = self.batch.loop
        if loop is not None and loop.is_running():
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_soon(self.flush)
        self.batch.loop = loop
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
        """Hand every queued line to the writer thread.

        Off the event loop, also wait until the thread has written them.
        """
        with self._guard:
            batch = self.batch
            batch.loop = None
            lines, batch.lines = batch.lines, []
            if lines:
                self._enqueue(lines)
        if not _loop_running() and not self._stalled:
            self._stalled = not self.wait_written(DRAIN_TIMEOUT)
        self._report_drops()

    def wait_written(self, timeout: float) -> bool:
        """Wait until every queued line is written; return False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self) -> None:
        """Write what is queued (waiting at most DRAIN_TIMEOUT), then close.

        Lines dropped since the last warning are reported now, whatever the
        interval, so the count at exit is complete.
        """
        self.flush()
        self._report_drops(force=True)
        super().close()

    def _enqueue(self, lines: list[str]) -> None:
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_forever, name="pgproxy-access-log", daemon=True
            )
            self._writer.start()
        try:
            self._queue.put_nowait(lines)
        except queue.Full:
            self.dropped_lines += len(lines)

    def _write_forever(self) -> None:
        while True:
            lines = self._queue.get()
            try:
                for chunk in _batches(lines):
                    self.stream.write(chunk)
                    self.stream.flush()
                    self._stalled = False
            except (OSError, ValueError) as exc:
                # A closed or broken stdout must not stop the proxy. It is
                # logged once, because every later write would fail the same way.
                if not self._failed:
                    self._failed = True
                    logging.getLogger(__name__).error(
                        "cannot write access log lines, dropping them: %s", exc
                    )
            finally:
                self._queue.task_done()

    def _report_drops(self, force: bool = False) -> None:
        dropped = self.dropped_lines - self._dropped_reported
        now = time.monotonic()
        due = force or now - self._drop_logged_at >= _DROP_LOG_INTERVAL
        if dropped and due:
            self._dropped_reported = self.dropped_lines
            self._drop_logged_at = now
            logging.getLogger(__name__).warning(
                "access log output is not being read: dropped %d lines "
                "(%d since start)",
                dropped,
                self.dropped_lines,
            )


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _batches(lines: list[str]) -> list[str]:
    """Return the lines joined into writes of at most PIPE_ATOMIC_BYTES each.

    A longer line is a write of its own. ASCII lines (every JSON line) are
    joined once and cut at line ends, so the writer thread runs a few steps
    per write instead of several per line.
    """
    if not lines:
        return []
    text = "\n".join(lines) + "\n"
    if not text.isascii():
        return _batches_by_line(lines)
    size = len(text)
    batches = []
    start = 0
    while size - start > PIPE_ATOMIC_BYTES:
        # The last line end within the limit, or the end of an overlong line.
        end = text.rfind("\n", start, start + PIPE_ATOMIC_BYTES)
        if end < start:
            end = text.index("\n", start + PIPE_ATOMIC_BYTES)
        batches.append(text[start : end + 1])
        start = end + 1
    if start < size:
        batches.append(text[start:])
    return batches


def _batches_by_line(lines: list[str]) -> list[str]:
    """Batch lines by their UTF-8 size, for text that is not all ASCII."""
    batches: list[str] = []
    group: list[str] = []
    size = 0
    for line in lines:
        length = len(line.encode("utf-8", "replace")) + 1
        if group and size + length > PIPE_ATOMIC_BYTES:
            group.append("")
            batches.append("\n".join(group))
            group = []
            size = 0
        group.append(line)
        size += length
    if group:
        group.append("")
        batches.append("\n".join(group))
    return batches


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
