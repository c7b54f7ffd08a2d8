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
- Only a connection that delivered exactly one complete response goes back
  to its pool. The exchange is detached when its response completes, and
  the pool decision waits until the rest of that read has been parsed: any
  byte after the response (other than the CRLF llhttp skips), and any byte
  arriving while idle, closes the connection, so it can never be taken for
  the start of the next request's response.
- A response head is read up to the cluster's `max_response_header_bytes`;
  a larger one fails the exchange with 502 and closes the connection, so
  the memory held for a head stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
# Default limit on an upstream response's status line and header fields, the
# same as the listeners' default request head limit (max_header_bytes).
MAX_RESPONSE_HEAD = 64 * 1024
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


class _ResponseHeadTooLarge(Exception):
    """Raised inside an llhttp callback to stop parsing an oversized head."""


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
        self._head_bytes = 0
        self._head_read = 0
        self.max_head = pool.max_response_head
        # The exchange whose response completed during the current read; it
        # is told once the whole read has parsed (see data_received).
        self._finished: Exchange | None = None
        self._stray = False

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
            self._on_parse_error(exc)
        finished = self._finished
        if finished is not None:
            self._complete(finished)
            return
        if self.exchange is None:
            return
        if self._in_head:
            # httptools holds a header field split over reads until it ends,
            # so the reads ending inside the head are counted as well.
            self._head_read += len(data)
            if self._head_read > self.max_head:
                self._fail_head_too_large()
                return
        self.exchange.flush_response()

    def _on_parse_error(self, exc: httptools.HttpParserError) -> None:
        if self._finished is not None:
            # Bytes after a complete response that are no response at all.
            self._stray = True
            self.keep_alive = False
        elif self.exchange is None:
            return
        elif isinstance(exc.__context__, _ResponseHeadTooLarge):
            self._fail_head_too_large()
        else:
            self.fail(f"invalid response: {exc}", "bad_response")

    def _complete(self, exchange: Exchange) -> None:
        """Tell `exchange` its response is complete, once the read has parsed."""
        self._finished = None
        if self._stray:
            self._stray = False
            logger.warning(
                "endpoint %s sent bytes after a complete response; "
                "closing the connection instead of reusing it",
                self.endpoint,
            )
        self.exchange = exchange
        exchange.on_response_complete()

    def _fail_head_too_large(self) -> None:
        self.fail(
            f"response header block larger than {self.max_head} bytes "
            "(max_response_header_bytes)",
            "response_header_too_large",
        )

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
        if self.exchange is None:
            # A second response in the read that completed the first one.
            self._stray = True
            self.keep_alive = False
        self._headers = []
        self._reason = b""
        self._in_head = True
        self._head_bytes = 0
        self._head_read = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._head_bytes += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name, value))
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > self.max_head:
                raise _ResponseHeadTooLarge

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
            # The old parser reads the rest of this read, and any byte it
            # finds there is stray.
            self._parser = httptools.HttpResponseParser(self)
            self.exchange = None
            self._finished = exchange

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_response_body(body)
        else:
            self._stray = True
            self.keep_alive = False

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        if self._parser.get_status_code() < 200:
            exchange.on_interim_complete()
            return
        # Detach now, so that bytes after the response in this read reach no
        # exchange; the pool decision is made after the read in `_complete`.
        self.exchange = None
        self._finished = exchange

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
        self.max_head = self.pool.max_response_head

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
        if self.closed or self.sock is None or not self.keep_alive:
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
        ssl_context: Callable[[str | None], ssl.SSLContext],
    ) -> None:
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.active = 0
        self.opened = 0
        self.max_response_head = MAX_RESPONSE_HEAD
        # CA file verifying https:// endpoints; None means the system store.
        self.tls_ca_file: str | None = None
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
        context = self._ssl_context(self.tls_ca_file) if endpoint.tls else None
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
        # TLS client contexts by (CA file, its mtime in ns); (None, 0) is the
        # system trust store.
        self._ssl: dict[tuple[str | None, int], ssl.SSLContext] = {}

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

    def retire(self, cluster: str, address: str) -> int:
        """Drop the pool of an endpoint that a reload removed.

        Its idle connections close now; connections in use close when they
        are released, because the pool keeps no idle connection any more.
        Returns how many idle connections were closed.
        """
        pool = self._pools.pop((cluster, address), None)
        if pool is None:
            return 0
        closed = pool.idle
        pool.max_idle = 0
        pool.close_idle()
        return closed

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

    def _ssl_context(self, ca_file: str | None) -> ssl.SSLContext:
        """Return the context verifying upstream certificates against `ca_file`.

        The file is read again when its modification time changes, so a
        rotated CA file applies to new connections without a reload. Raises
        OSError naming the file when it cannot be loaded.
        """
        try:
            key = (ca_file, os.stat(ca_file).st_mtime_ns if ca_file else 0)
            context = self._ssl.get(key)
            if context is None:
                context = ssl.create_default_context(cafile=ca_file)
                self._ssl = {k: v for k, v in self._ssl.items() if k[0] != ca_file}
                self._ssl[key] = context
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f'cannot load tls_ca_file "{ca_file}": {exc}') from exc
        return context
