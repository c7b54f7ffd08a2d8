"""Access records: one line per request on the `pgproxy.access` logger.

Formats: "json" (one object per line with the keys of `AccessRecord`),
"combined" (the Apache/nginx combined format followed by the proxy's own
fields), or "off". `bytes_in` and `bytes_out` count body bytes, received from
the client and sent to it. `endpoint` is the last endpoint tried, and
`failure` a short flag such as connect_failure or route_timeout, or null.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

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


_COMBINED_ONLY = ("referer", "user_agent", "version")


def rfc3339(timestamp: float) -> str:
    """Format a Unix time as RFC 3339 UTC with milliseconds."""
    seconds = int(timestamp)
    millis = int((timestamp - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def format_json(record: AccessRecord) -> str:
    """Render a record as one JSON object."""
    fields = asdict(record)
    for name in _COMBINED_ONLY:
        del fields[name]
    fields["time"] = rfc3339(record.time)
    return json.dumps(fields, separators=(",", ":"))


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
        self._render = format_combined if fmt == "combined" else format_json

    @property
    def enabled(self) -> bool:
        """Whether records are written at all (checked before building one)."""
        return self.format != "off" and logger.isEnabledFor(logging.INFO)

    def write(self, record: AccessRecord) -> None:
        """Log one record on the pgproxy.access logger."""
        logger.info("%s", self._render(record))
