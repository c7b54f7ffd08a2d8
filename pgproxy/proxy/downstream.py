"""The client side: one asyncio Protocol per downstream connection.

Invariants:
- Requests are answered in the order they arrived. Only the front exchange
  of the queue talks to an upstream; a pipelined request waits, and reading
  pauses until it is at the front, so buffered input stays within one read.
- An exchange starts (route, pick, connect) only after the read that
  completed its head has been parsed without error, so a request whose
  head or first body bytes are malformed is answered with 4xx and never
  reaches an upstream.
- Malformed requests are logged at DEBUG only: hostile traffic must not
  flood the log.
- One timer per connection serves every deadline: idle keep-alive, header
  read, and the front exchange's route and response header timeouts. It is
  re-armed only when a deadline moves earlier, not per request.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, cast

import httptools

from pgproxy.graph.types import Listener
from pgproxy.observability.metrics import ConnectionStats
from pgproxy.proxy.exchange import Exchange
from pgproxy.proxy.framing import FramingError, check_request_head
from pgproxy.proxy.headers import Forwarding, HeaderMap, is_trusted
from pgproxy.proxy.respond import error_response
from pgproxy.proxy.upstream import WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW

if TYPE_CHECKING:
    from pgproxy.proxy.service import ProxyService

logger = logging.getLogger(__name__)

_TOKEN_AND_SPACE_RE = re.compile(rb"^(?:\r\n)*[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ")
_PAUSE_BODY = 1
_PAUSE_PIPELINE = 2
_IDLE = 1
_HEADER = 2
# Shared and never appended to: on_header appends only inside a head, and
# on_message_begin gives each head a list of its own.
_NO_HEADERS: list[tuple[bytes, bytes]] = []


class DownstreamProtocol(asyncio.Protocol):
    """Parses requests from one client and runs them as Exchanges, in order."""

    # With this many attributes CPython 3.11 stops sharing dict keys, so each
    # connection would carry a dict of its own (1.6 KiB measured, 3.11.7).
    __slots__ = (
        "_carry",
        "_chunk",
        "_close_when_done",
        "_closed",
        "_conn_deadline",
        "_conn_deadline_kind",
        "_connection_stats",
        "_eof",
        "_error",
        "_feeding",
        "_front_started",
        "_head_bytes",
        "_header_bytes",
        "_headers",
        "_in_head",
        "_parser",
        "_paused",
        "_queue",
        "_receiving",
        "_scan_from",
        "_starting",
        "_timer",
        "_timer_at",
        "_tls",
        "_tunnel",
        "_url",
        "client",
        "client_ip",
        "forwarding",
        "limits",
        "listener_name",
        "loop",
        "service",
        "transport",
    )

    def __init__(self, service: ProxyService, listener: Listener) -> None:
        self.service = service
        self.listener_name = listener.name
        self.limits = listener.config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.client_ip = ""
        self.forwarding = Forwarding("", b"http", False)
        self._parser = httptools.HttpRequestParser(self)
        # A list, not a deque: a deque allocates a 64-slot block per
        # connection, and the queue holds at most a few pipelined requests.
        self._queue: list[Exchange] = []
        self._receiving: Exchange | None = None
        self._front_started = False
        self._starting = False
        self._feeding = False
        self._tunnel: Exchange | None = None
        self._connection_stats: ConnectionStats | None = None
        self._closed = False
        self._close_when_done = False
        self._eof = False
        self._tls = False
        self._paused = 0
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = _NO_HEADERS
        self._header_bytes = 0
        self._error: tuple[int, str] | None = None
        # Raw bytes of the read being parsed, and of a head split over reads,
        # to check the request line llhttp parses leniently.
        self._chunk = b""
        self._scan_from = 0
        self._carry = bytearray()
        self._conn_deadline = 0.0
        self._conn_deadline_kind = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __repr__(self) -> str:
        return (
            f"<DownstreamProtocol {self.client} listener={self.listener_name} "
            f"queued={len(self._queue)} closed={self._closed}>"
        )

    # connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            host = str(peer[0])
            self.client_ip = host
            self.client = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        trusted = is_trusted(self.client_ip, self.service.current.trusted_proxies)
        self._tls = transport.get_extra_info("sslcontext") is not None
        proto = b"https" if self._tls else b"http"
        self.forwarding = Forwarding(self.client_ip, proto, trusted)
        self.service.connections.add(self)
        metrics = self.service.current.metrics
        if metrics is not None and self.listener_name in metrics:
            self._connection_stats = metrics[self.listener_name].connections
            self._connection_stats.connection_opened()
        if self.service.draining:
            self.close()
            return
        self._set_conn_deadline(_HEADER, self.limits.header_read_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.service.forget(self)
        if self._connection_stats is not None:
            self._connection_stats.connection_closed()
            self._connection_stats = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue, self._queue = self._queue, []
        if queue and self._front_started:
            queue[0].on_client_closed()

    def eof_received(self) -> bool | None:
        # A FIN comes from a client giving up or from one that half-closed
        # after its last request (fortio -halfclose) and still reads. Only the
        # second kind requests closing after the response (Connection: close,
        # or HTTP/1.0 without keep-alive). Its requests are served, as HAProxy
        # does without `option abortonclose`, and the connection closes after
        # the last response. Any other client is gone, so its exchange is
        # cancelled, as nginx does by default (proxy_ignore_client_abort off),
        # and an abandoned request frees its upstream.
        if self._eof:
            return True  # resume_reading after EOF reports it again
        self._eof = True
        if self._can_serve_after_eof():
            self._close_when_done = True
            return True
        self._client_gone()
        return False

    def _can_serve_after_eof(self) -> bool:
        # An incomplete request can never finish. asyncio's TLS transports
        # cannot stay half-open. A tunnel, or an upgrade request that may
        # become one, ends with the client's side.
        if not self._queue or self._tls or self._tunnel is not None:
            return False
        last = self._queue[-1]
        return (
            self._receiving is None
            and not self._in_head
            and not last.info.keep_alive
            and last.info.upgrade is None
        )

    def _client_gone(self) -> None:
        # The transport closes once this callback returns. Ending the exchange
        # now keeps a response that completes before connection_lost from
        # being written to a closing transport and logged as delivered.
        self._closed = True
        queue, self._queue = self._queue, []
        if queue and self._front_started:
            queue[0].on_client_closed()

    def pause_writing(self) -> None:
        if self._queue and self._front_started:
            upstream = self._queue[0].upstream
            if upstream is not None:
                upstream.pause_reading()

    def resume_writing(self) -> None:
        if self._queue and self._front_started:
            upstream = self._queue[0].upstream
            if upstream is not None:
                upstream.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.on_tunnel_client_data(data)
            return
        was_in_head = self._in_head
        self._feeding = True
        self._chunk = data
        self._scan_from = 0
        try:
            error = self._feed(data)
        finally:
            self._feeding = False
            self._chunk = b""
        if error is not None:
            self._reject(*error)
        elif self._in_head:
            if was_in_head:
                self._head_bytes += len(data)
            if not was_in_head:
                self._carry = bytearray(data[self._scan_from :])
            else:
                self._carry += data
            if max(self._head_bytes, self._header_bytes) > self.limits.max_header_bytes:
                self._reject(431, "request header fields too large")
        self._run_queue()

    def _feed(self, data: bytes) -> tuple[int, str] | None:
        """Parse bytes; return the status and reason of a malformed request."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._on_upgrade_request(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, FramingError):
                return cause.status, str(cause)
            logger.error(
                "error handling a request from %s", self.client, exc_info=cause
            )
            return 500, "internal error"
        except httptools.HttpParserInvalidMethodError:
            # RFC 9110 section 9.1: a well-formed but unknown method is 501.
            if _TOKEN_AND_SPACE_RE.match(data):
                return 501, "method not implemented"
            return 400, "malformed request: invalid method"
        except httptools.HttpParserError as exc:
            return _parser_error_status(exc), f"malformed request: {exc}"
        return None

    # llhttp callbacks

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        if self._conn_deadline_kind == _IDLE:
            self._set_conn_deadline(_HEADER, self.limits.header_read_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field of a chunked body: not forwarded
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._conn_deadline = 0.0
        self._conn_deadline_kind = 0
        if self._header_bytes > self.limits.max_header_bytes:
            raise FramingError("request header fields too large", status=431)
        parser = self._parser
        method = parser.get_method()
        self._check_request_line(method)
        version = parser.get_http_version()
        info = check_request_head(method, self._url, version, self._headers)
        limit = self.limits.max_body_bytes
        if limit and info.content_length is not None and info.content_length > limit:
            raise FramingError("request body too large", status=413)
        exchange = Exchange(self, method, self._headers, info, version == "1.0")
        # The exchange owns the head now; an idle connection keeps none of it.
        self._headers = _NO_HEADERS
        self._url = b""
        if self._queue:
            self._pause(_PAUSE_PIPELINE)
        self._queue.append(exchange)
        self._receiving = exchange

    def _check_request_line(self, method: bytes) -> None:
        # RFC 9112 section 3 puts exactly one SP between the parts of the
        # request line. llhttp accepts several, and a proxy must not be more
        # lenient than the servers behind it.
        line = b"%b %b HTTP/" % (method, self._url)
        if self._carry:
            found = (self._carry + self._chunk).find(line) >= 0
            self._carry = bytearray()
        else:
            index = self._chunk.find(line, self._scan_from)
            found = index >= 0
            if found:
                self._scan_from = index + len(line)
        if not found:
            raise FramingError("invalid request line")

    def on_body(self, body: bytes) -> None:
        exchange = self._receiving
        if exchange is None:
            return
        limit = self.limits.max_body_bytes
        if limit and exchange.bytes_in + len(body) > limit:
            raise FramingError("request body too large", status=413)
        exchange.on_request_body(body)

    def on_message_complete(self) -> None:
        exchange, self._receiving = self._receiving, None
        if exchange is not None:
            exchange.on_request_complete()

    # exchange queue

    def _run_queue(self) -> None:
        """Start the front exchange if it has not started yet."""
        if self._starting or self._feeding:
            return
        self._starting = True
        try:
            while self._queue and not self._front_started and not self._closed:
                self._front_started = True
                self._queue[0].start()
        finally:
            self._starting = False

    def exchange_done(self, exchange: Exchange) -> None:
        """Move on after the front exchange ended: next request, idle, or close."""
        if not self._queue or self._queue[0] is not exchange:
            return
        self._queue.pop(0)
        self._front_started = False
        self._resume(_PAUSE_BODY)
        if self._tunnel is exchange:
            return
        if not exchange.client_keep_alive or (
            self._close_when_done and not self._queue
        ):
            self.close()
            return
        if self._queue:
            if len(self._queue) == 1 and self._receiving is self._queue[0]:
                self._resume(_PAUSE_PIPELINE)
            self._run_queue()
            if not self._queue and self._paused & _PAUSE_PIPELINE:
                self._resume(_PAUSE_PIPELINE)
            return
        self._resume(_PAUSE_PIPELINE)
        if self._error is not None:
            status, message = self._error
            self._write_error(status, message)
        elif self.service.draining:
            self.close()
        elif not self._in_head:
            self._set_conn_deadline(_IDLE, self.limits.idle_timeout)

    def header_map(self, headers: list[tuple[bytes, bytes]]) -> HeaderMap:
        """Return the lower-case name -> value view used by routing."""
        return HeaderMap(headers)

    # errors

    def _reject(self, status: int, message: str) -> None:
        """Reject a malformed request after replying to the requests before it."""
        logger.debug(
            "rejecting request from %s with %d: %s", self.client, status, message
        )
        receiving, self._receiving = self._receiving, None
        self._in_head = False
        self._pause(_PAUSE_PIPELINE)
        if receiving is not None:
            if receiving is self._front_or_none() and self._front_started:
                receiving.abort_request(status, message)
                return
            # It has not started, so nothing reached an upstream. Reply in its place.
            self._queue.remove(receiving)
        if self._queue:
            self._error = (status, message)
            self._run_queue()
            return
        self._write_error(status, message)

    def _front_or_none(self) -> Exchange | None:
        return self._queue[0] if self._queue else None

    def _write_error(self, status: int, message: str) -> None:
        self._count_unrouted(status)
        self.write(error_response(status, message, close=True))
        self.close()

    def _count_unrouted(self, status: int) -> None:
        """Count a request rejected before routing (4xx on its head or framing)."""
        metrics = self.service.current.metrics
        listener = metrics.get(self.listener_name) if metrics is not None else None
        if listener is not None:
            listener.unrouted.observe(status, 0.0, 0)

    # used by exchanges

    def write(self, data: bytes) -> None:
        """Write bytes to the client unless the connection is gone."""
        if not self._closed and self.transport is not None:
            self.transport.write(data)

    def pause_body(self) -> None:
        """Stop reading request bytes (upstream busy or not connected yet)."""
        self._pause(_PAUSE_BODY)

    def resume_body(self) -> None:
        """Read request bytes again."""
        self._resume(_PAUSE_BODY)

    @property
    def tunnel(self) -> Exchange | None:
        """The upgraded exchange relaying raw bytes, or None."""
        return self._tunnel

    def start_tunnel(self, exchange: Exchange) -> None:
        """Relay raw bytes between the client and the exchange's upstream."""
        self._tunnel = exchange
        self._conn_deadline = 0.0
        self._resume(_PAUSE_BODY | _PAUSE_PIPELINE)

    def _on_upgrade_request(self, rest: bytes) -> None:
        exchange = self._queue[-1] if self._queue else None
        if exchange is not None and rest:
            exchange.early_data += rest
        # Bytes after an upgrade request belong to the new protocol, or to
        # nothing if the upstream refuses: stop parsing HTTP on this connection.
        self._pause(_PAUSE_PIPELINE)

    def drain(self) -> None:
        """Close now if idle, otherwise after the response in progress."""
        self._close_when_done = True
        if not self._queue and not self._in_head:
            self.close()

    def close(self) -> None:
        """Close after writing what is buffered."""
        if not self._closed and self.transport is not None:
            self._closed = True
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once, so a cut response cannot look complete."""
        if self.transport is not None:
            self._closed = True
            self.transport.abort()

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.resume_reading()

    # deadlines

    def _set_conn_deadline(self, kind: int, timeout: float) -> None:
        self._conn_deadline_kind = kind
        self._conn_deadline = self.loop.time() + timeout
        self.watch_deadline(self._conn_deadline)

    def watch_deadline(self, at: float) -> None:
        """Make sure the connection timer fires no later than `at`."""
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self.loop.time()
        if self._conn_deadline and now >= self._conn_deadline:
            self._on_conn_deadline()
            return
        if self._queue and self._front_started:
            self._queue[0].on_deadline(now)
        pending = [self._conn_deadline]
        if self._queue and self._front_started:
            pending.append(self._queue[0].next_deadline())
        later = [at for at in pending if at]
        if later and not self._closed:
            self.watch_deadline(min(later))

    def _on_conn_deadline(self) -> None:
        if self._conn_deadline_kind == _HEADER and (self._in_head or self._head_bytes):
            logger.debug("header read timeout for %s", self.client)
            self._write_error(408, "request header read timed out")
        else:
            self.close()


def _parser_error_status(exc: httptools.HttpParserError) -> int:
    if "Invalid HTTP version" in str(exc):
        return 505
    return 400
