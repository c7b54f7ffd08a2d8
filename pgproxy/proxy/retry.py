"""Retry policy: may a failed attempt be repeated on another endpoint?

Pure decisions over the route's `retries` and `retry_on`. A retry is safe
by default only when no byte of the request reached the upstream (connect
failure). A reset before any response byte, and upstream 502/503/504
responses, are retried only when the route lists them; status retries also
need an idempotent method (RFC 9110 section 9.2.2) or an Idempotency-Key
header. Every retry needs the whole request body still held for replay.
Separately, an idempotent request whose pooled connection closed before any
response byte is repeated once on a fresh connection to the same endpoint.
"""

from __future__ import annotations

from typing import Final

from pgproxy.errors import EndpointBusyError, UpstreamError
from pgproxy.graph.types import Route

IDEMPOTENT_METHODS: Final = frozenset(
    {b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"}
)


def may_retry_error(
    route: Route, attempts: int, replayable: bool, error: UpstreamError
) -> bool:
    """Return whether a failed attempt (no response yet) may be retried."""
    if attempts > route.retries or not replayable:
        return False
    if isinstance(error, EndpointBusyError):
        # Every endpoint was at its limit when this one was picked, and the
        # wait for it already took connect_timeout.
        return False
    if not error.bytes_sent:
        return "connect-failure" in route.retry_on
    return error.flag == "upstream_reset" and "reset-before-response" in route.retry_on


def may_retry_fresh_connection(
    error: UpstreamError,
    already_retried: bool,
    method: bytes,
    has_idempotency_key: bool,
    replayable: bool,
) -> bool:
    """Return whether to repeat an attempt on a fresh connection to the same endpoint.

    A pooled connection that closes before any response byte most likely lost
    the race with the upstream's keep-alive timeout, so the request is sent
    once more on a new connection, as Go's net/http and Pingora do. The
    upstream may have read the request before closing, so only idempotent
    requests (or ones with an Idempotency-Key) are repeated, once per
    request. This repeat is not a retry of the route's policy.
    """
    return (
        error.pooled_before_response
        and not already_retried
        and replayable
        and (method in IDEMPOTENT_METHODS or has_idempotency_key)
    )


def may_retry_status(
    route: Route,
    attempts: int,
    status: int,
    method: bytes,
    has_idempotency_key: bool,
    body_replayable: bool,
) -> bool:
    """Return whether an upstream 502/503/504 response may be retried elsewhere.

    `body_replayable` is true when the request is complete and every body
    byte is still held.
    """
    return (
        status in route.retry_on
        and attempts <= route.retries
        and body_replayable
        and (method in IDEMPOTENT_METHODS or has_idempotency_key)
    )
