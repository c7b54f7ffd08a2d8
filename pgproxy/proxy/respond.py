"""Responses the proxy writes itself: error replies and fixed `respond` routes.

Every error reply has a short text/plain body naming the problem, and
`Connection: close` when the proxy closes the connection after it, so the
client never waits on a connection that is going away.
"""

from __future__ import annotations

import http

from pgproxy.graph.settings import RespondSettings
from pgproxy.proxy.framing import NO_BODY_STATUSES

# Seconds a client is asked to wait after a 503 because no endpoint can serve.
RETRY_AFTER_SECONDS = 5


def reason_phrase(status: int) -> bytes:
    """Return the standard reason phrase of a status, or an empty one."""
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def error_body(message: str) -> bytes:
    """Return the body of an error reply: the message on one line."""
    return f"{message}\n".encode()


def error_response(
    status: int,
    message: str,
    *,
    close: bool,
    head_only: bool = False,
    retry_after: int | None = None,
) -> bytes:
    """Build a complete error response with a one-line text body."""
    body = error_body(message)
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if retry_after is not None:
        parts.append(b"Retry-After: %d\r\n" % retry_after)
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


class FixedResponse:
    """A `respond` route's reply, encoded once and reused for every request."""

    __slots__ = ("body", "head", "status")

    def __init__(self, settings: RespondSettings) -> None:
        self.status = settings.status
        self.body = settings.body.encode()
        lines = [b"HTTP/1.1 %d %s\r\n" % (self.status, reason_phrase(self.status))]
        names = {name.lower() for name, _ in settings.headers}
        if "content-type" not in names and self.status not in NO_BODY_STATUSES:
            lines.append(b"Content-Type: text/plain; charset=utf-8\r\n")
        for name, value in settings.headers:
            if name.lower() in ("content-length", "connection", "transfer-encoding"):
                continue
            lines.append(f"{name}: {value}\r\n".encode())
        # RFC 9110 section 8.6: no Content-Length in a 204. A 304 may carry one
        # only if it equals the length of the 200 it replaces, which is unknown.
        if self.status in NO_BODY_STATUSES:
            self.body = b""
        else:
            lines.append(b"Content-Length: %d\r\n" % len(self.body))
        self.head = b"".join(lines)

    def render(self, *, close: bool, head_only: bool) -> bytes:
        """Return the bytes to write for one request."""
        connection = b"Connection: close\r\n\r\n" if close else b"\r\n"
        if head_only:
            return self.head + connection
        return self.head + connection + self.body
