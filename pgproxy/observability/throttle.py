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
NOTE: a kind that stops failing never reports the lines it left out last.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Hashable
from typing import Final

# Seconds between two lines of one kind.
INTERVAL: Final = 1.0
# Kinds remembered at most. Endpoints and clusters come from the config, but
# reloads can replace them, so the table is bounded.
MAX_KINDS: Final = 1024
_DIGITS: Final = re.compile(r"[0-9]+")


class LogThrottle:
    """Decides which failure lines to log: the first of each kind per interval."""

    __slots__ = ("_clock", "_interval", "_last", "_skipped")

    def __init__(
        self, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._skipped: dict[Hashable, int] = {}

    def __repr__(self) -> str:
        return f"<LogThrottle kinds={len(self._last)} interval={self._interval:g}s>"

    def admit(self, kind: Hashable) -> int | None:
        """Return None to leave a line out, else how many of its kind were left out."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return None
        if last is None and len(self._last) >= MAX_KINDS:
            self._last.clear()
            self._skipped.clear()
        self._last[kind] = now
        return self._skipped.pop(kind, 0)


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
    skipped = _THROTTLE.admit(kind)
    if skipped is None:
        return
    if skipped:
        message += " (%d more like this since the last such line)"
        args = (*args, skipped)
    logger.log(level, message, *args)
