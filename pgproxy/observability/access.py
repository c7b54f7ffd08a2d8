"""Access records: one line per request on the `pgproxy.access` logger.

Formats: "json" (one object per line with the keys of `AccessRecord` except
the combined-only ones), "combined" (the Apache/nginx combined format
followed by the proxy's own fields), or "off". `bytes_in` and `bytes_out`
count body bytes, received from the client and sent to it. `endpoint` is the
last endpoint tried, and `failure` a short flag such as connect_failure or
route_timeout, or null.

Invariant: every string in a JSON line goes through the JSON string encoder
(RFC 8259 section 7), so a client-controlled path or method can neither
break the object nor forge keys. The line is formatted directly, without
copying the record into a dict, because it is written once per request.
"""

from __future__ import annotations

import logging
import time
from asyncio import _get_running_loop
from json.encoder import encode_basestring_ascii
from typing import Final

from pgproxy.observability.batch import LineBatch
from pgproxy.observability.logging import MAX_PENDING_LINES, AccessLineHandler

logger = logging.getLogger("pgproxy.access")


class AccessRecord:
    """The facts logged about one request.

    A plain class, not a dataclass: compiled, its constructor is a direct
    call, where the dataclass's generated __init__ ran as Python (8,400
    instructions a record, callgrind).
    """

    __slots__ = (
        "attempts",
        "bytes_in",
        "bytes_out",
        "client",
        "cluster",
        "duration_ms",
        "endpoint",
        "failure",
        "listener",
        "method",
        "path",
        "referer",
        "route",
        "status",
        "time",
        "upstream_status",
        "user_agent",
        "version",
    )

    def __init__(
        self,
        time: float,
        client: str,
        listener: str,
        method: str,
        path: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration_ms: float,
        route: str | None,
        cluster: str | None,
        endpoint: str | None,
        attempts: int,
        failure: str | None,
        upstream_status: int | None,
        referer: str = "-",
        user_agent: str = "-",
        version: str = "1.1",
    ) -> None:
        self.time = time
        self.client = client
        self.listener = listener
        self.method = method
        self.path = path
        self.status = status
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.duration_ms = duration_ms
        self.route = route
        self.cluster = cluster
        self.endpoint = endpoint
        self.attempts = attempts
        self.failure = failure
        self.upstream_status = upstream_status
        # Written only in the combined format, which ends with them.
        self.referer = referer
        self.user_agent = user_agent
        self.version = version

    def __repr__(self) -> str:
        return (
            f"<AccessRecord {self.method} {self.path!r} {self.status} "
            f"route={self.route}>"
        )


class _SecondCache:
    """The formatted whole second of the last timestamp, reused within it."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = ""


_rfc3339_second = _SecondCache()
# ".000" to ".999", and with "Z" for timestamps: a format spec in compiled
# code is a str.format call, and one piece saves a concatenation.
_MILLIS: Final = tuple(f".{millis:03d}" for millis in range(1000))
_MILLIS_Z: Final = tuple(f".{millis:03d}Z" for millis in range(1000))
# "0" to "999": statuses, attempts and most small byte counts, without a
# conversion each.
_SMALL_INTS: Final = tuple(str(number) for number in range(1000))
# JSON encodings of the strings that repeat from request to request (client
# address, listener, route, cluster, endpoint names, methods, flags). Bounded:
# strings up to 256 characters, emptied when 4,096 are held.
_ENCODED: Final[dict[str, str]] = {}
_MAX_CACHED_STRING: Final = 256
_MAX_CACHED_STRINGS: Final = 4096


def rfc3339(timestamp: float) -> str:
    """Format a Unix time as RFC 3339 UTC with milliseconds."""
    seconds = int(timestamp)
    millis = int((timestamp - seconds) * 1000)
    cache = _rfc3339_second
    if cache.second != seconds:
        cache.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        cache.second = seconds
    return cache.text + _MILLIS_Z[millis]


def _encoded(value: str) -> str:
    """Return `value` as a JSON string literal, cached for repeated values."""
    text = _ENCODED.get(value)
    if text is None:
        text = encode_basestring_ascii(value)
        if len(value) <= _MAX_CACHED_STRING:
            if len(_ENCODED) >= _MAX_CACHED_STRINGS:
                _ENCODED.clear()
            _ENCODED[value] = text
    return text


def _milliseconds(value: float) -> str:
    """Format a duration in milliseconds with three decimals, as JSON.

    Integer arithmetic and a table, because repr() of a float runs the
    shortest-digits conversion: 2,500 instructions, a quarter of the line.
    """
    if value < 0:
        return repr(value)
    # int() of a float is a C conversion in compiled code; round() is a call.
    micros = int(value * 1000 + 0.5)
    return _int_text(micros // 1000) + _MILLIS[micros % 1000]


def _int_text(value: int) -> str:
    return _SMALL_INTS[value] if 0 <= value < 1000 else str(value)


def _string(value: str | None) -> str:
    return "null" if value is None else _encoded(value)


def format_json(record: AccessRecord) -> str:
    """Render a record as one JSON object (keys in the order of its fields)."""
    # Only str pieces: compiled code joins them in one call, where a format
    # spec or a conversion in an f-string costs a str.format call each.
    status = _int_text(record.status)
    bytes_in = _int_text(record.bytes_in)
    bytes_out = _int_text(record.bytes_out)
    duration = _milliseconds(record.duration_ms)
    attempts = _int_text(record.attempts)
    upstream_status = record.upstream_status
    upstream = "null" if upstream_status is None else _int_text(upstream_status)
    return (
        f'{{"time":"{rfc3339(record.time)}"'
        f',"client":{_encoded(record.client)}'
        f',"listener":{_encoded(record.listener)}'
        f',"method":{_encoded(record.method)}'
        f',"path":{encode_basestring_ascii(record.path)}'
        f',"status":{status},"bytes_in":{bytes_in},"bytes_out":{bytes_out}'
        f',"duration_ms":{duration}'
        f',"route":{_string(record.route)}'
        f',"cluster":{_string(record.cluster)}'
        f',"endpoint":{_string(record.endpoint)}'
        f',"attempts":{attempts}'
        f',"failure":{_string(record.failure)}'
        f',"upstream_status":{upstream}}}'
    )


def format_combined(record: AccessRecord) -> str:
    """Render a record in combined log format plus the proxy's fields."""
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(record.time))
    client_ip = record.client.rpartition(":")[0] or record.client
    return (
        f'{client_ip} - - [{stamp}] "{record.method} {record.path} '
        f'HTTP/{record.version}" {record.status} {record.bytes_out} '
        f'"{_quoted(record.referer)}" "{_quoted(record.user_agent)}" '
        f'route="{record.route or "-"}" endpoint="{record.endpoint or "-"}" '
        f"attempts={record.attempts} duration_ms={record.duration_ms:.1f} "
        f'failure="{record.failure or "-"}"'
    )


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class AccessLog:
    """Writes access records in the configured format, or nothing when off.

    When the logger's only handler is the one that setup_logging installs,
    a line goes straight into that handler's batch. With other handlers or
    filters, it goes through `logger.info`. The logger's lists of
    handlers and filters are kept by reference, not looked up per request:
    the logging module changes both in place (addHandler, removeHandler, addFilter,
    removeFilter, dictConfig).
    """

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self.combined = fmt == "combined"
        self._on = fmt != "off"
        self._handlers: list[logging.Handler] = logger.handlers
        self._filters = logger.filters
        # The only handler when it is an AccessLineHandler, and its batch.
        self._handler: AccessLineHandler | None = None
        self._batch: LineBatch | None = None

    @property
    def enabled(self) -> bool:
        """Whether records are written at all (checked before building one).

        While a batch of lines waits for a flush on the running loop, the
        logger's level was already checked for its first line. The level is
        therefore checked once per loop iteration, not once per request.
        """
        if not self._on:
            return False
        batch = self._batch
        if batch is not None:
            loop = batch.loop
            if loop is not None and loop is _get_running_loop():
                return True
        return logger.isEnabledFor(logging.INFO)

    def write(self, record: AccessRecord) -> None:
        """Log one record on the pgproxy.access logger."""
        # Direct calls, not a stored function: compiled code calls these in C.
        line = format_combined(record) if self.combined else format_json(record)
        handler = self._sole_handler()
        if handler is None:
            logger.info("%s", line)
            return
        batch = self._batch
        assert batch is not None
        # With a flush already scheduled on the running loop, the line joins
        # its batch here: write_line runs as Python, at about 5,000
        # instructions a line (callgrind).
        loop = batch.loop
        lines = batch.lines
        if (
            loop is not None
            and len(lines) < MAX_PENDING_LINES
            and loop is _get_running_loop()
        ):
            lines.append(line)
        else:
            handler.write_line(line)

    def _sole_handler(self) -> AccessLineHandler | None:
        """Return the logger's only handler if it is an AccessLineHandler."""
        handlers = self._handlers
        if len(handlers) != 1 or self._filters:
            return None
        handler = handlers[0]
        if handler is self._handler:
            return self._handler
        if type(handler) is not AccessLineHandler:
            return None
        self._handler = handler
        self._batch = handler.batch
        return handler
