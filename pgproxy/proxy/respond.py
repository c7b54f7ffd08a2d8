"""Responses the proxy writes itself: error replies, `respond` and `redirect` routes.

Every error reply has a short text/plain body naming the problem, and
`Connection: close` when the proxy closes the connection after it, so the
client never waits on a connection that is going away.
"""

from __future__ import annotations

import http
from typing import Final

from pgproxy.graph.settings import RedirectSettings, RespondSettings
from pgproxy.proxy.framing import NO_BODY_STATUSES

# Seconds a client is asked to wait after a 503 because no endpoint can serve.
RETRY_AFTER_SECONDS = 5
# Ports a Location leaves out, because they are its scheme's default.
_DEFAULT_PORTS: Final = {b"http": b"80", b"https": b"443"}


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


class Redirect:
    """A `redirect` route's reply; only its Location is built per request.

    The Location is the request's URL with the configured parts replaced.
    The request's port stays only while its scheme and host do, and a
    port that is the scheme's default is left out. The host and target come
    from a request head that passed the framing checks, so neither contains
    CR, LF or a space.
    """

    __slots__ = ("head", "host", "path", "port", "scheme", "status", "strip_query")

    def __init__(self, settings: RedirectSettings) -> None:
        self.status = settings.status
        self.head = b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nLocation: " % (
            settings.status,
            reason_phrase(settings.status),
        )
        self.scheme = settings.scheme.encode("ascii") if settings.scheme else b""
        self.host = settings.host.lower().encode("ascii") if settings.host else b""
        self.port = b"%d" % settings.port if settings.port else b""
        self.path = settings.path.encode("ascii") if settings.path else b""
        self.strip_query = settings.strip_query

    def __repr__(self) -> str:
        return f"<Redirect {self.status} {self.scheme!r} {self.host!r}>"

    def location(self, proto: bytes, host_raw: bytes, target: bytes) -> bytes | None:
        """Return the Location for a request, or None if its host is unknown.

        `proto` is the request's scheme, `host_raw` its Host value (or the
        authority of an absolute-form target), `target` its origin-form
        target.
        """
        scheme = self.scheme or proto
        host, port = self.host, self.port
        if not host:
            if not host_raw:
                return None
            host, request_port = _split_host(host_raw)
            if not port and scheme == proto:
                port = request_port
        if port == _DEFAULT_PORTS.get(scheme):
            port = b""
        path, mark, query = (
            (b"/", b"", b"") if target == b"*" else target.partition(b"?")
        )
        if self.path:
            path = self.path
        if self.strip_query:
            mark = query = b""
        authority = host + b":" + port if port else host
        return scheme + b"://" + authority + path + mark + query

    def render(self, location: bytes, *, close: bool) -> bytes:
        """Return the bytes to write for one request; the body is empty."""
        connection = b"\r\nConnection: close\r\n\r\n" if close else b"\r\n\r\n"
        return self.head + location + connection


def _split_host(raw: bytes) -> tuple[bytes, bytes]:
    """Split a Host value into its lower-case host and its port (maybe empty)."""
    if raw.startswith(b"["):
        end = raw.find(b"]") + 1
        host, rest = raw[:end], raw[end:]
        return host.lower(), rest[1:] if rest.startswith(b":") else b""
    host, _, port = raw.partition(b":")
    return host.lower(), port
