"""The admin listener: /metrics, /healthz and /status over plain HTTP/1.1.

Invariants:
- Only GET and HEAD are served; other methods get 405 with `Allow`. Unknown
  paths get 404. A malformed request gets 400 and the connection closes, and
  one that sends no complete request within `HEADER_READ_TIMEOUT` of its
  first byte is closed. Over `MAX_CONNECTIONS` open connections, a new one
  gets 503 and is closed at once.
- `/healthz` answers 503 from the moment draining starts, while the proxy
  listeners are still open, so an outer load balancer stops sending before
  connections are refused.
- Request parsing is h11's (RFC 9112); this module only routes and answers.
  The admin listener is meant for loopback: it has no authentication.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import anyio
import anyio.abc
import h11

from pgproxy.config.parsing import parse_host_port
from pgproxy.server.listeners import bind_socket

logger = logging.getLogger(__name__)

HEADER_READ_TIMEOUT = 10.0  # seconds from a request's first byte to its end
IDLE_TIMEOUT = 30.0  # seconds a keep-alive connection may wait for a request
MAX_REQUEST_BYTES = 16 * 1024  # request line, headers and body together
MAX_CONNECTIONS = 64
REJECT_LINGER = 1.0  # seconds a rejected connection is read before it closes
# accept(2) errors that leave the listening socket usable: the process or the
# system is out of file descriptors or memory for now.
_ACCEPT_RETRY_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
)
ACCEPT_RETRY_DELAY = 0.1  # seconds before accepting again after such an error
ACCEPT_WARNING_INTERVAL = 10.0  # seconds between two warnings about them
_READ_SIZE = 4096
# Prometheus text exposition format 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class AdminSources:
    """Data source of the admin endpoints.

    `metrics` returns Prometheus text, `status` returns a JSON-serialisable
    mapping, and `draining` returns whether the process is shutting down.
    """

    metrics: Callable[[], Awaitable[bytes]]
    status: Callable[[], Awaitable[Mapping[str, Any]]]
    draining: Callable[[], bool]


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


class AdminServer:
    """Serves the admin endpoints on one address (loopback by default)."""

    def __init__(self, address: str, sources: AdminSources | None = None) -> None:
        self.address = address
        self._sources = sources
        self._socket: socket.socket | None = None
        self._connections = 0
        self._rejected = 0  # connections rejected since the listener became full
        self._accept_warned_at: float | None = None
        self.bound_address = address

    def __repr__(self) -> str:
        return f"<AdminServer {self.bound_address}>"

    def bind(self) -> str:
        """Bind the address; return the bound `host:port` (real port for port 0).

        Binding happens before the event loop serves, like the proxy
        listeners, so a bind failure stops start-up. Raises OSError when the
        address cannot be bound.
        """
        host, port = parse_host_port(self.address)
        self._socket = bind_socket(host, port)
        sockname = self._socket.getsockname()
        self.bound_address = format_address(sockname[0], sockname[1])
        return self.bound_address

    async def serve(self, sources: AdminSources | None = None) -> None:
        """Accept connections until cancelled; `bind` must have been called.

        `sources` replaces the ones given at construction, for a server bound
        before the state it reports on exists.
        """
        if sources is not None:
            self._sources = sources
        if self._socket is None or self._sources is None:
            raise RuntimeError("AdminServer.serve() needs bind() and sources")
        listener = await anyio.abc.SocketListener.from_socket(self._socket)
        self._socket = None
        async with listener, anyio.create_task_group() as group:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # anyio's SocketListener.serve (4.16.0) re-raises accept
                    # errors, so running out of descriptors stopped the process.
                    if exc.errno not in _ACCEPT_RETRY_ERRNOS:
                        raise
                    self._warn_accept_failed(exc)
                    await anyio.sleep(ACCEPT_RETRY_DELAY)
                    continue
                group.start_soon(self._handle, stream)

    def _warn_accept_failed(self, exc: OSError) -> None:
        now = anyio.current_time()
        last = self._accept_warned_at
        if last is not None and now - last < ACCEPT_WARNING_INTERVAL:
            return
        self._accept_warned_at = now
        logger.warning(
            "admin listener: accept failed, retrying every %gs: %s",
            ACCEPT_RETRY_DELAY,
            exc,
        )

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            if self._connections >= MAX_CONNECTIONS:
                await self._reject_busy(stream)
                return
            self._connections += 1
            try:
                await self._converse(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the client went away; nothing to answer
            finally:
                self._connections -= 1
                if self._rejected and self._connections < MAX_CONNECTIONS:
                    logger.info(
                        "admin listener: rejected %d connections while full",
                        self._rejected,
                    )
                    self._rejected = 0

    async def _reject_busy(self, stream: anyio.abc.SocketStream) -> None:
        """Answer 503 and close: waiting for a free slot could last forever.

        The request is read (for up to `REJECT_LINGER` seconds) after the
        answer, because closing with unread input would reset the connection
        and could discard the answer before the client reads it.
        """
        self._rejected += 1
        if self._rejected == 1:
            logger.warning(
                "admin listener: %d connections open; rejecting new ones with 503",
                MAX_CONNECTIONS,
            )
        body = b"too many admin connections\n"
        head = (
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        with (
            anyio.move_on_after(REJECT_LINGER),
            contextlib.suppress(OSError, anyio.BrokenResourceError),
        ):
            await stream.send(head + body)
            await stream.send_eof()
            for _ in range(MAX_REQUEST_BYTES // _READ_SIZE):
                if not await _receive(stream):
                    break

    async def _converse(self, stream: anyio.abc.SocketStream) -> None:
        connection = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES
        )
        while True:
            try:
                request = await self._read_request(stream, connection)
            except h11.RemoteProtocolError as error:
                logger.debug("malformed admin request: %s", error)
                await self._send_error(stream, connection, error.error_status_hint)
                return
            except TimeoutError:
                return
            if request is None:
                return
            reply = await self._dispatch(request)
            await self._send(stream, connection, request, reply)
            if connection.our_state is not h11.DONE:
                return
            if connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()

    async def _read_request(
        self, stream: anyio.abc.SocketStream, connection: h11.Connection
    ) -> h11.Request | None:
        """Read one whole request (the body is discarded); None on a clean close."""
        request: h11.Request | None = None
        received = 0
        # Until the first byte the idle timeout applies; from then on one
        # deadline bounds the whole request, so a byte a second cannot hold
        # the connection open by restarting a per-read timeout.
        deadline = anyio.current_time() + IDLE_TIMEOUT
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    data = await _receive(stream)
                if received == 0:
                    deadline = anyio.current_time() + HEADER_READ_TIMEOUT
                # h11 caps only an incomplete event; a whole request that
                # arrived at once is capped here.
                received += len(data)
                if received > MAX_REQUEST_BYTES:
                    status = 413 if request is not None else 431
                    raise h11.RemoteProtocolError("request too large", status)
                connection.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _dispatch(self, request: h11.Request) -> _Reply:
        sources = self._sources
        assert sources is not None  # checked by serve()
        if request.method not in (b"GET", b"HEAD"):
            return _Reply(
                405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),)
            )
        path = request.target.split(b"?", 1)[0]
        if path == b"/healthz":
            if sources.draining():
                return _Reply(503, b"draining\n")
            return _Reply(200, b"ok\n")
        if path == b"/metrics":
            return _Reply(200, await sources.metrics(), METRICS_CONTENT_TYPE)
        if path == b"/status":
            status = await sources.status()
            body = json.dumps(status, indent=2, sort_keys=True).encode() + b"\n"
            return _Reply(200, body, "application/json")
        return _Reply(404, b"not found: try /metrics, /healthz or /status\n")

    async def _send(
        self,
        stream: anyio.abc.SocketStream,
        connection: h11.Connection,
        request: h11.Request,
        reply: _Reply,
    ) -> None:
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            ("Cache-Control", "no-store"),
            *reply.headers,
        ]
        data = connection.send(h11.Response(status_code=reply.status, headers=headers))
        if request.method != b"HEAD":
            data += connection.send(h11.Data(data=reply.body))
        data += connection.send(h11.EndOfMessage())
        await stream.send(data)

    async def _send_error(
        self, stream: anyio.abc.SocketStream, connection: h11.Connection, status: int
    ) -> None:
        if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        try:
            data = connection.send(h11.Response(status_code=status, headers=headers))
            data += connection.send(h11.Data(data=body))
            data += connection.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return
        await stream.send(data)


def format_address(host: str, port: int) -> str:
    """Format a host and port as `host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _receive(stream: anyio.abc.SocketStream) -> bytes:
    try:
        return await stream.receive(_READ_SIZE)
    except anyio.EndOfStream:
        return b""
