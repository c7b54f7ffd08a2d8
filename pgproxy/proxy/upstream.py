"""Upstream connections and the per-endpoint keep-alive pools.

Invariants:
- This is the one module that sees socket, ssl and llhttp errors of the
  upstream side; each becomes an UpstreamError whose `bytes_sent` says
  whether any byte of the request was written on that connection.
- A connection is in exactly one place: owned by one exchange, idle in its
  endpoint's pool, or closed. Pools are LIFO stacks, so the most recently
  used connection (the one least likely to have been closed by the
  upstream) is reused first and idle ones expire from the bottom.
- A pooled connection is checked for a pending EOF or stray bytes before
  reuse (a non-blocking MSG_PEEK), so a connection the upstream already
  closed is replaced before any byte of a request is written to it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools

from pgproxy.errors import UpstreamError
from pgproxy.graph.types import Endpoint

if TYPE_CHECKING:
    from pgproxy.proxy.exchange import Exchange

logger = logging.getLogger(__name__)

# Write buffer above which the sending side pauses reading its source.
WRITE_BUFFER_HIGH = 256 * 1024
WRITE_BUFFER_LOW = 64 * 1024
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an endpoint, parsing responses with llhttp.

    Parser events are forwarded to the owning exchange. `reused` counts the
    requests sent before the current one; `bytes_sent` and
    `response_started` tell a failure before the response from one after it.
    """

    def __init__(self, endpoint: Endpoint, pool: EndpointPool) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.exchange: Exchange | None = None
        self.closed = False
        self.reused = 0
        self.idle_since = 0.0
        self.bytes_sent = False
        self.response_started = False
        self.keep_alive = True
        self.tunnel = False
        self.head_only = False
        self.reading_paused = False
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._in_head = False

    def __repr__(self) -> str:
        return (
            f"<UpstreamConnection {self.endpoint.address} reused={self.reused} "
            f"closed={self.closed}>"
        )

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: the upstream is out of step with us.
            self.close()
            return
        self.response_started = True
        if self.tunnel:
            exchange.on_tunnel_upstream_data(data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            exchange.on_upgraded(data[offset:])
        except httptools.HttpParserError as exc:
            if self.exchange is not None:
                self.fail(f"invalid response: {exc}", "bad_response")
            return
        if self.exchange is not None:
            self.exchange.flush_response()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        exchange = self.exchange
        if exchange is None:
            return
        if self.tunnel:
            exchange.on_tunnel_closed()
        elif not self.response_started:
            reason = f"connection closed before the response: {exc or 'EOF'}"
            self.fail(reason, "upstream_reset")
        elif not exchange.on_upstream_eof():
            self.fail(
                f"connection closed mid-response: {exc or 'EOF'}", "upstream_reset"
            )

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_request_body()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.resume_request_body()

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""
        self._in_head = True

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        exchange = self.exchange
        if exchange is None:
            return
        parser = self._parser
        status = parser.get_status_code()
        exchange.on_response_head(
            status, self._reason, self._headers, parser.get_http_version()
        )
        if self.head_only and status >= 200 and self.exchange is exchange:
            # llhttp cannot be told that a HEAD response has no body; finish
            # the message here and parse the next response with a new parser.
            self._parser = httptools.HttpResponseParser(self)
            exchange.on_response_complete()

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_response_body(body)
        else:
            self.keep_alive = False

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if self._parser.get_status_code() < 200:
            exchange.on_interim_complete()
        else:
            exchange.on_response_complete()

    # used by the exchange

    def send(self, data: bytes) -> None:
        """Write request bytes; a closed connection drops them silently."""
        if self.transport is not None and not self.closed:
            self.bytes_sent = True
            self.transport.write(data)

    def start(self, exchange: Exchange, head_only: bool) -> None:
        """Attach the connection to an exchange for one request."""
        self.exchange = exchange
        self.head_only = head_only
        self.bytes_sent = False
        self.response_started = False
        self.keep_alive = True

    def pause_reading(self) -> None:
        """Stop reading the response (the client's write buffer is full)."""
        if self.transport is not None and not self.closed and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the response again."""
        if self.transport is not None and not self.closed and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def is_reusable(self) -> bool:
        """Return whether no EOF, error or unread byte is waiting on the socket."""
        if self.closed or self.sock is None:
            return False
        try:
            waiting = self.sock.recv(1, _PEEK_FLAGS)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        # b"" is the upstream's FIN; any byte is a response nobody asked for.
        del waiting
        return False

    def close(self) -> None:
        """Close the connection and detach it from its exchange."""
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.pool.discard(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, discarding unsent bytes."""
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.pool.discard(self)
            if self.transport is not None:
                self.transport.abort()

    def fail(self, message: str, flag: str) -> None:
        exchange = self.exchange
        self.abort()
        if exchange is not None:
            error = UpstreamError(
                message,
                endpoint=self.endpoint.address,
                status=502,
                flag=flag,
                bytes_sent=self.bytes_sent,
            )
            exchange.on_upstream_failed(error)


class EndpointPool:
    """Idle keep-alive connections to one endpoint, most recently used on top.

    `active` counts connections handed out and not yet returned or closed.
    Expiry runs from one timer per pool, armed only while connections idle.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        idle_timeout: float,
        max_idle: int,
        ssl_context: Callable[[], ssl.SSLContext],
    ) -> None:
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.active = 0
        self.opened = 0
        self._ssl_context = ssl_context
        self._idle: list[UpstreamConnection] = []
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return (
            f"<EndpointPool {self.endpoint.address} idle={len(self._idle)} "
            f"active={self.active} opened={self.opened}>"
        )

    @property
    def idle(self) -> int:
        """Number of idle connections."""
        return len(self._idle)

    def acquire(self) -> UpstreamConnection | None:
        """Pop the newest usable idle connection, closing stale ones on the way."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.is_reusable():
                conn.reused += 1
                self.active += 1
                return conn
            logger.debug("closing stale pooled connection to %s", conn.endpoint)
            conn.close()
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection after a complete exchange, or close it."""
        self.active -= 1
        conn.exchange = None
        if conn.closed or not conn.keep_alive or len(self._idle) >= self.max_idle:
            conn.close()
            return
        # A connection paused for a slow client must read again while idle, to
        # see the upstream's EOF and to read the next response.
        conn.resume_reading()
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._timer is None:
            self._timer = loop.call_at(
                conn.idle_since + self.idle_timeout, self._expire
            )

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget a connection that closed while idle."""
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def forget_active(self) -> None:
        """Count down a connection handed out that will not come back."""
        self.active -= 1

    def close_idle(self) -> None:
        """Close every idle connection (shutdown, or endpoint removed)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self.idle_timeout
        idle = self._idle
        while idle and idle[0].idle_since <= deadline:
            idle.pop(0).close()
        if idle:
            when = idle[0].idle_since + self.idle_timeout
            self._timer = loop.call_at(when, self._expire)

    async def connect(self, timeout: float) -> UpstreamConnection:
        """Open a new connection within `timeout` seconds.

        Raises UpstreamError with `bytes_sent=False`: 502 with flag
        connect_failure, or 504 with flag connect_timeout.
        """
        endpoint = self.endpoint
        try:
            async with asyncio.timeout(timeout):
                conn = await self._open()
        except TimeoutError:
            raise UpstreamError(
                f"connect to {endpoint.address} timed out after {timeout:g}s",
                endpoint=endpoint.address,
                status=504,
                flag="connect_timeout",
                retryable=True,
                bytes_sent=False,
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(
                f"connect to {endpoint.address} failed: {_describe(exc)}",
                endpoint=endpoint.address,
                status=502,
                flag="connect_failure",
                retryable=True,
                bytes_sent=False,
            ) from None
        self.opened += 1
        self.active += 1
        return conn

    async def _open(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        infos = await loop.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM
        )
        error: OSError = OSError(f"no address found for {endpoint.host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, address)
                return await self._wrap(sock)
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error

    async def _wrap(self, sock: socket.socket) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        context = self._ssl_context() if endpoint.tls else None
        _, conn = await loop.create_connection(
            lambda: UpstreamConnection(endpoint, self),
            sock=sock,
            ssl=context,
            server_hostname=endpoint.host if context is not None else None,
        )
        conn.sock = sock
        return conn


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup failed ({exc.strerror})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({exc.verify_message})"
    return str(exc) or type(exc).__name__


class Pools:
    """Every endpoint's pool, keyed by endpoint address, kept across reloads."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str, str], EndpointPool] = {}
        self._ssl: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        idle = sum(pool.idle for pool in self._pools.values())
        active = sum(pool.active for pool in self._pools.values())
        return f"<Pools endpoints={len(self._pools)} idle={idle} active={active}>"

    def get(
        self, endpoint: Endpoint, idle_timeout: float, max_idle: int
    ) -> EndpointPool:
        """Return the endpoint's pool, creating it on first use."""
        key = (endpoint.cluster, endpoint.address)
        pool = self._pools.get(key)
        if pool is None:
            pool = EndpointPool(endpoint, idle_timeout, max_idle, self._ssl_context)
            self._pools[key] = pool
        return pool

    def all(self) -> list[EndpointPool]:
        """Return every pool."""
        return list(self._pools.values())

    def close_idle(self) -> int:
        """Close every idle connection of every pool; return how many closed."""
        count = 0
        for pool in self._pools.values():
            count += pool.idle
            pool.close_idle()
        return count

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl
