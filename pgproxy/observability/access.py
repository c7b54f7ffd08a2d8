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
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii

from pgproxy.observability.logging import AccessLineHandler

logger = logging.getLogger("pgproxy.access")


@dataclass(slots=True)
class AccessRecord:
    """The facts logged about one request."""

    time: float
    client: str
    listener: str
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    duration_ms: float
    route: str | None
    cluster: str | None
    endpoint: str | None
    attempts: int
    failure: str | None
    upstream_status: int | None
    # Written only in the combined format, which ends with them.
    referer: str = "-"
    user_agent: str = "-"
    version: str = "1.1"


class _SecondCache:
    """The formatted whole second of the last timestamp, reused within it."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = ""


_rfc3339_second = _SecondCache()


def rfc3339(timestamp: float) -> str:
    """Format a Unix time as RFC 3339 UTC with milliseconds."""
    seconds = int(timestamp)
    millis = int((timestamp - seconds) * 1000)
    cache = _rfc3339_second
    if cache.second != seconds:
        cache.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        cache.second = seconds
    return f"{cache.text}.{millis:03d}Z"


def _string(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def format_json(record: AccessRecord) -> str:
    """Render a record as one JSON object (keys in declaration order)."""
    upstream_status = record.upstream_status
    return (
        f'{{"time":"{rfc3339(record.time)}"'
        f',"client":{encode_basestring_ascii(record.client)}'
        f',"listener":{encode_basestring_ascii(record.listener)}'
        f',"method":{encode_basestring_ascii(record.method)}'
        f',"path":{encode_basestring_ascii(record.path)}'
        f',"status":{int(record.status)}'
        f',"bytes_in":{int(record.bytes_in)}'
        f',"bytes_out":{int(record.bytes_out)}'
        f',"duration_ms":{float(record.duration_ms)!r}'
        f',"route":{_string(record.route)}'
        f',"cluster":{_string(record.cluster)}'
        f',"endpoint":{_string(record.endpoint)}'
        f',"attempts":{int(record.attempts)}'
        f',"failure":{_string(record.failure)}'
        ',"upstream_status":'
        f"{'null' if upstream_status is None else int(upstream_status)}}}"
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
    """Writes access records in the configured format, or nothing when off."""

    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self.combined = fmt == "combined"
        self._render = format_combined if self.combined else format_json

    @property
    def enabled(self) -> bool:
        """Whether records are written at all (checked before building one)."""
        return self.format != "off" and logger.isEnabledFor(logging.INFO)

    def write(self, record: AccessRecord) -> None:
        """Log one record on the pgproxy.access logger.

        With the handler that setup_logging installs (and nothing else on the
        logger), the line goes straight into its buffer: building a
        LogRecord per request would cost more than formatting the line.
        """
        line = self._render(record)
        handlers = logger.handlers
        if len(handlers) == 1 and not logger.filters:
            handler = handlers[0]
            if type(handler) is AccessLineHandler:
                handler.write_line(line)
                return
        logger.info("%s", line)
