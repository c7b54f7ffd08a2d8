"""Process log lines about failed requests, at most one per kind per second.

Every failed request is in the access log, with its flag and endpoint, and
in the metrics. The process log repeats failures for the operator, but when
an endpoint or a whole cluster fails every request, one line per request
floods the log and slows the proxy. With both endpoints of a cluster
refusing connections, pgproxy served about 3,600 req/s with those lines and
5,400 with them off. So each kind of failure (what failed, and where) is
logged at most once per interval, and the next line of that kind reports
how many were left out meanwhile. A kind is usually the endpoint and the
error's message with its digits masked (`message_kind`).

A kind that stops failing has no next line, so `flush_failure_lines` logs
the last line left out of each kind that has been quiet for an interval,
with the count of the others. The health sweeper of every serving process
calls it every `SWEEP_PERIOD_S` (pgproxy/health/passive.py), and the
runtime calls it once more at shutdown, so a count is reported at most
about one interval plus one sweep period after its last failure.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Hashable
from typing import Final, NamedTuple

logger = logging.getLogger(__name__)

# Seconds between two lines of one kind.
INTERVAL: Final = 1.0
# Kinds remembered at most. Endpoints and clusters come from the config, but
# reloads can replace them, so the table is bounded. `take_due` drops the
# kinds that have been quiet for an interval, so the table fills only when
# this many kinds failed within about one interval.
MAX_KINDS: Final = 1024
_DIGITS: Final = re.compile(r"[0-9]+")


class FailureLine(NamedTuple):
    """A process log line about a failure, kept while it is left out.

    Its args stay as they were passed, exceptions included, until the line
    is logged or a later line of its kind replaces it.
    """

    logger: logging.Logger
    level: int
    message: str
    args: tuple[object, ...]


class LogThrottle:
    """Decides which failure lines to log: the first of each kind per interval.

    It keeps the last line left out of each kind, with the count of lines
    left out, until the next line of that kind or `take_due` reports them.
    """

    __slots__ = (
        "_clock",
        "_interval",
        "_last",
        "_left_out",
        "dropped_kinds",
        "dropped_lines",
    )

    def __init__(
        self, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        # The time of each kind's last logged line.
        self._last: dict[Hashable, float] = {}
        # The last line left out of each kind, and how many were left out.
        self._left_out: dict[Hashable, tuple[FailureLine, int]] = {}
        # Left-out lines, and their kinds, forgotten when the table was full.
        self.dropped_lines = 0
        self.dropped_kinds = 0

    def __repr__(self) -> str:
        return (
            f"<LogThrottle kinds={len(self._last)} left_out={len(self._left_out)} "
            f"interval={self._interval:g}s>"
        )

    def admit(self, kind: Hashable, line: FailureLine) -> int | None:
        """Return None to leave `line` out, else how many of its kind were left out.

        When the table already contains MAX_KINDS kinds and `kind` is new, the
        table is cleared first, and the counts it kept are added to
        `dropped_lines` and `dropped_kinds`.
        """
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            pending = self._left_out.get(kind)
            self._left_out[kind] = (line, 1 if pending is None else pending[1] + 1)
            return None
        if last is None and len(self._last) >= MAX_KINDS:
            self._forget_all()
        self._last[kind] = now
        pending = self._left_out.pop(kind, None)
        return 0 if pending is None else pending[1]

    def take_due(self, *, every_kind: bool = False) -> list[tuple[FailureLine, int]]:
        """Remove and return the left-out lines of kinds quiet for an interval.

        Each item is the last line left out of a kind and the count of lines
        left out of it. Such a kind then counts as logged now, so that its
        next line still waits an interval. A kind quiet for an interval with
        nothing left out is forgotten. `every_kind` returns the left-out
        lines of every kind, quiet or not, for a process about to exit.
        """
        now = self._clock()
        due: list[tuple[FailureLine, int]] = []
        for kind, last in list(self._last.items()):
            if not every_kind and now - last < self._interval:
                continue
            pending = self._left_out.pop(kind, None)
            if pending is None:
                del self._last[kind]
            else:
                due.append(pending)
                self._last[kind] = now
        return due

    def take_dropped(self) -> tuple[int, int]:
        """Return and reset the counts of lines and kinds that clearing dropped."""
        dropped = (self.dropped_lines, self.dropped_kinds)
        self.dropped_lines = 0
        self.dropped_kinds = 0
        return dropped

    def _forget_all(self) -> None:
        self.dropped_lines += sum(count for _, count in self._left_out.values())
        self.dropped_kinds += len(self._left_out)
        self._last.clear()
        self._left_out.clear()


_THROTTLE = LogThrottle()


def message_kind(message: str) -> str:
    """Return `message` with each run of digits replaced by "#", as part of a kind.

    Messages that quote the upstream's bytes, such as "status code 731 is
    outside 100-599", would otherwise make a new kind for each value that a
    faulty endpoint sends, and a line per request.
    """
    return _DIGITS.sub("#", message)


def log_failure(
    logger: logging.Logger,
    level: int,
    kind: Hashable,
    message: str,
    *args: object,
) -> None:
    """Log `message % args` unless a line of the same `kind` was logged just now."""
    if not logger.isEnabledFor(level):
        return
    throttle = _THROTTLE
    skipped = throttle.admit(kind, FailureLine(logger, level, message, args))
    if skipped is None:
        return
    if throttle.dropped_lines:
        _log_dropped(throttle)
    if skipped:
        message += " (%d more like this since the last such line)"
        args = (*args, skipped)
    logger.log(level, message, *args)


def flush_failure_lines(*, every_kind: bool = False) -> int:
    """Log the left-out lines of kinds that stopped failing; return how many.

    Each line is the last one left out of its kind, followed by the count
    of the others. `every_kind` also logs those of kinds that failed less
    than an interval ago, for a process about to exit.
    """
    throttle = _THROTTLE
    due = throttle.take_due(every_kind=every_kind)
    for line, count in due:
        message, args = line.message, line.args
        if count > 1:
            message += " (%d more like this since the last such line)"
            args = (*args, count - 1)
        line.logger.log(line.level, message, *args)
    return len(due)


def _log_dropped(throttle: LogThrottle) -> None:
    lines, kinds = throttle.take_dropped()
    logger.warning(
        "%d process log lines about failed requests, of %d kinds, were left out "
        "and will not be reported, because more than %d kinds of failure were "
        "throttled at the same time",
        lines,
        kinds,
        MAX_KINDS,
    )
