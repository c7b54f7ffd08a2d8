"""The exception tree of pgproxy.

    PgproxyError
    ├── ConfigError          a config file failed to load; carries every Diagnostic
    └── ProxyError           one request failed; carries status, side and retry safety
        ├── DownstreamError  the client sent something we reject (4xx)
        ├── UpstreamError    an endpoint failed (502 / 504)
        │   └── EndpointBusyError  the endpoint is at max_connections (503)
        └── NoEndpointError  no endpoint of the cluster may be tried (503)

Third-party exceptions (socket, ssl, httpcore, pydantic, tomllib) are
translated into this tree at the edge that sees them, so the rest of the code
handles only these classes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgproxy.config.diagnostics import Diagnostic


class PgproxyError(Exception):
    """Root of every error that pgproxy raises on purpose."""


class ConfigError(PgproxyError):
    """A config could not be loaded; `diagnostics` lists every problem found."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = list(diagnostics)
        first = self.diagnostics[0].render() if self.diagnostics else "invalid config"
        more = len(self.diagnostics) - 1
        super().__init__(first if more <= 0 else f"{first} (and {more} more)")


class Side(enum.Enum):
    """The peer that caused a proxy error."""

    DOWNSTREAM = "downstream"
    UPSTREAM = "upstream"
    INTERNAL = "internal"


class ProxyError(PgproxyError):
    """One request failed.

    `status` is the HTTP status sent to the client, `side` names who caused it,
    `retryable` tells whether another endpoint may be tried with the same request
    (true only when the request provably never reached the upstream, or the
    route's retry policy allows it), and `flag` is the short failure name
    written to the access log.
    """

    status = 500
    side = Side.INTERNAL
    flag = "internal"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        flag: str | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if flag is not None:
            self.flag = flag
        self.retryable = retryable


class DownstreamError(ProxyError):
    """The client sent a request we reject; it never reaches an upstream."""

    status = 400
    side = Side.DOWNSTREAM
    flag = "bad_request"


class UpstreamError(ProxyError):
    """An endpoint failed: connect failure or bad response (502), timeout (504)."""

    status = 502
    side = Side.UPSTREAM
    flag = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        retryable: bool = False,
        flag: str | None = None,
        bytes_sent: bool = True,
        pooled_before_response: bool = False,
    ) -> None:
        super().__init__(message, status=status, retryable=retryable, flag=flag)
        self.endpoint = endpoint
        # False when no byte of the request was written to the upstream, which
        # makes a retry safe for any method.
        self.bytes_sent = bytes_sent
        # True when a connection taken from the pool closed before any byte of
        # the response: most likely the upstream's keep-alive timeout raced
        # the request, not a fault of the endpoint.
        self.pooled_before_response = pooled_before_response


class EndpointBusyError(UpstreamError):
    """No connection to the endpoint became free within the wait's limit.

    The endpoint is not at fault (pgproxy's own `max_connections` is), so
    this is no failure for outlier detection, and no byte of the request
    was sent.
    """

    status = 503
    flag = "upstream_overflow"

    def __init__(self, message: str, *, endpoint: str) -> None:
        super().__init__(message, endpoint=endpoint, bytes_sent=False)


class NoEndpointError(ProxyError):
    """Every endpoint of the cluster is unhealthy, ejected or already tried."""

    status = 503
    side = Side.UPSTREAM
    flag = "no_healthy_endpoint"
