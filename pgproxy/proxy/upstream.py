"""Upstream connections: one HTTP/1.1 connection to an endpoint and its responses.

Invariants:
- Socket, ssl and llhttp errors of an upstream connection become an
  UpstreamError whose `bytes_sent` records whether any byte of the request
  was written on that connection (connect errors: pgproxy/proxy/pool.py).
- Only a connection that delivered exactly one complete response goes back
  to its pool. The exchange is detached when its response completes, and
  the pool decision waits until the rest of that read has been parsed: any
  byte after the response (other than the CRLF llhttp skips), and any byte
  arriving while idle, closes the connection, so it can never be taken for
  the start of the next request's response.
- A final response whose head arrives whole in the first read, framed by
  Content-Length or without a body, is read by
  pgproxy/proxy/response_head.py, and its body bytes are counted here, so
  llhttp parses none of that response. llhttp parses every other response.
- A response head is read up to the cluster's `max_response_header_bytes`,
  counted from the first byte of its status line through the CRLF CRLF
  that ends it. A larger head fails the exchange with 502 and closes the
  connection, so the memory held for a head stays bounded. Reads ending
  inside a head are counted as they arrive. A complete head is measured
  byte for byte, but only when the reads it came in exceed the limit.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, cast

import httptools

from pgproxy.errors import UpstreamError
from pgproxy.graph.types import Endpoint
from pgproxy.observability.throttle import log_failure
from pgproxy.proxy.response_head import ResponseHead, read_response_head

if TYPE_CHECKING:
    from pgproxy.proxy.exchange import Exchange
    from pgproxy.proxy.pool import EndpointPool

logger = logging.getLogger(__name__)

# Write buffer above which the sending side pauses reading its source.
WRITE_BUFFER_HIGH: Final = 256 * 1024
WRITE_BUFFER_LOW: Final = 64 * 1024
# Default limit on an upstream response head, the same as the listeners'
# default request head limit (max_header_bytes).
MAX_RESPONSE_HEAD: Final = 64 * 1024
_HEAD_END: Final = b"\r\n\r\n"
# The parser of every lost connection: never fed, and holding no protocol.
_LOST_PARSER: Final = httptools.HttpResponseParser(object())
_PEEK_FLAGS: Final = socket.MSG_PEEK | socket.MSG_DONTWAIT
# Idle time from which a pooled connection is peeked at before reuse.
PEEK_AFTER_IDLE: Final = 0.25


class _ResponseHeadTooLarge(Exception):
    """Raised inside an llhttp callback to stop parsing an oversized head."""


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an endpoint, parsing responses with llhttp.

    Parser events are forwarded to the owning exchange. `reused` counts the
    requests sent before the current one; `bytes_sent` and
    `response_started` tell a failure before the response from one after it.
    """

    __slots__ = (
        "_body_left",
        "_finished",
        "_head_read",
        "_head_tail",
        "_header_names",
        "_headers",
        "_heads_in_read",
        "_in_head",
        "_is_closing",
        "_parser",
        "_read",
        "_reason",
        "_stray",
        "_write",
        "bytes_sent",
        "closed",
        "endpoint",
        "exchange",
        "head_only",
        "idle_since",
        "keep_alive",
        "max_head",
        "pool",
        "reading_paused",
        "response_started",
        "reused",
        "sock",
        "transport",
        "tunnel",
    )

    def __init__(self, endpoint: Endpoint, pool: EndpointPool) -> None:
        self.endpoint = endpoint
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        # Methods of the transport called per request, bound once: compiled
        # code looks a method of a Python object up by name on every call.
        self._write: Callable[[bytes], object] | None = None
        self._is_closing: Callable[[], bool] | None = None
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
        self._header_names: list[bytes] = []
        self._in_head = False
        # Bytes of the current head in earlier reads, and the last 3 of them.
        self._head_read = 0
        self._head_tail = b""
        # The read being parsed, and the number of messages begun in it.
        self._read = b""
        self._heads_in_read = 0
        self.max_head = pool.max_response_head
        # The exchange whose response completed during the current read. Its
        # on_response_complete runs after the whole read is parsed.
        self._finished: Exchange | None = None
        self._stray = False
        # Body bytes still to come of a response whose head was read by
        # read_response_head. llhttp parses none of that response.
        self._body_left = 0

    def __repr__(self) -> str:
        return (
            f"<UpstreamConnection {self.endpoint.address} reused={self.reused} "
            f"closed={self.closed}>"
        )

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self._write = transport.write
        self._is_closing = transport.is_closing
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: the upstream is out of step with us.
            self.close()
            return
        if self._body_left:
            self._relay_body(exchange, data)
            return
        if not self.response_started:
            self.response_started = True
            # The first read of a response starts at a message boundary: a
            # connection is pooled only after a complete response, with
            # nothing after it.
            head = read_response_head(
                data, self.max_head, self.head_only, self.pool.layout
            )
            if head is not None:
                self._on_read_head(exchange, head)
                return
        if self.tunnel:
            exchange.on_tunnel_upstream_data(data)
            return
        self._read = data
        self._heads_in_read = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # llhttp stops at any 101 head, also one the exchange rejected:
            # then the bytes after it belong to no tunnel and are dropped.
            if self.tunnel:
                offset = upgrade.args[0]
                exchange.on_upgraded(data[offset:])
        except httptools.HttpParserError as exc:
            self._on_parse_error(exc)
        # An idle pooled connection must not keep its last read alive.
        self._read = b""
        finished = self._finished
        if finished is not None:
            self._complete(finished)
            return
        if self.exchange is None:
            return
        if self._in_head:
            # httptools buffers a header field split over reads until it ends,
            # so the reads ending inside the head are counted as well.
            self._count_head_read(data)
            if self._head_read > self.max_head:
                self._fail_head_too_large()
                return
        self.exchange.flush_response()

    def _count_head_read(self, data: bytes) -> None:
        """Count the head bytes of a read that ends inside a response head."""
        if self._heads_in_read:
            self._head_read = len(data) - _head_start(data, self._heads_in_read)
            self._head_tail = data[-3:]
        else:
            self._head_read += len(data)
            self._head_tail = (self._head_tail + data)[-3:]

    def _on_read_head(self, exchange: Exchange, head: ResponseHead) -> None:
        """Relay a head from read_response_head and the body bytes after it."""
        exchange.on_read_response_head(head)
        if self.exchange is not exchange:
            return  # the exchange retries elsewhere or failed
        self._body_left = head.body_length
        if head.body:
            self._relay_body(exchange, head.body)
        elif self._body_left:
            exchange.flush_response()
        else:
            self._complete(exchange)

    def _relay_body(self, exchange: Exchange, data: bytes) -> None:
        """Relay body bytes of a length-framed response read without llhttp."""
        left = self._body_left
        if len(data) > left:
            # Bytes after the response: the upstream is out of step with us,
            # unless they are CR and LF only, which llhttp skips before a
            # message and which therefore keep the connection here too.
            if data[left:].strip(b"\r\n"):
                self._stray = True
                self.keep_alive = False
            data = data[:left]
        self._body_left = left = left - len(data)
        if data:
            exchange.on_response_body(data)
        if not left and self.exchange is exchange:
            self._complete(exchange)

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
            log_failure(
                logger,
                logging.WARNING,
                ("stray", self.endpoint),
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
        # connection_lost follows in a later callback; until then the pool
        # must already see that this connection cannot carry another request.
        self.keep_alive = False
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        # The parser and the transport hold this protocol: dropping them lets
        # reference counting free the connection instead of the cyclic GC.
        self._parser = _LOST_PARSER
        self.transport = None
        self._write = None
        self._is_closing = None
        exchange = self.exchange
        if exchange is None:
            return
        if self.tunnel:
            exchange.on_tunnel_closed()
        elif not self.response_started:
            reason = f"connection closed before the response: {exc or 'EOF'}"
            self.fail(reason, "upstream_reset")
        elif exc is not None or not exchange.on_upstream_eof():
            # Only an EOF ends a body that runs until the connection closes.
            # An upstream that resets drops what is still in its send buffer.
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
        self._header_names = []
        self._reason = b""
        self._in_head = True
        self._head_read = 0
        self._heads_in_read += 1

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._headers.append((name, value))
            self._header_names.append(name.lower())

    def on_headers_complete(self) -> None:
        self._in_head = False
        # A head no larger than the reads it came in needs no measuring, which
        # saves a scan of the read for most responses.
        if self._head_read + len(self._read) > self.max_head:
            self._check_head_size()
        exchange = self.exchange
        if exchange is None:
            return
        parser = self._parser
        status = parser.get_status_code()
        exchange.on_response_head(
            status,
            self._reason,
            self._headers,
            self._header_names,
            parser.get_http_version(),
        )
        if self.head_only and status >= 200 and self.exchange is exchange:
            # llhttp cannot be told that a HEAD response has no body; finish
            # the message here and parse the next response with a new parser.
            # The old parser reads the rest of this read, and any byte it
            # finds there is stray.
            self._parser = httptools.HttpResponseParser(self)
            self.exchange = None
            self._finished = exchange

    def _check_head_size(self) -> None:
        """Stop parsing a head that just ended if it is larger than the limit."""
        data = self._read
        if self._heads_in_read:
            start = _head_start(data, self._heads_in_read)
            size = data.find(_HEAD_END, start) + 4 - start
        else:
            # The head began in an earlier read, and its CRLF CRLF may start
            # in the bytes kept from the reads before this one.
            tail = self._head_tail
            size = self._head_read + (tail + data).find(_HEAD_END) + 4 - len(tail)
        if size > self.max_head:
            raise _ResponseHeadTooLarge

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
        parser = self._parser
        if parser.get_status_code() < 200:
            if not parser.should_keep_alive():
                # A 1xx with Connection: close still precedes the final
                # response, and the connection closes after that response.
                # llhttp (httptools 0.9.0) rejects any byte after such a head
                # unless this leniency is set, and it parses the final response
                # with fresh flags, so self.keep_alive keeps the close.
                self.keep_alive = False
                parser.set_dangerous_leniencies(lenient_keep_alive=True)
            exchange.on_interim_complete()
            return
        if not parser.should_keep_alive():
            # llhttp (httptools 0.9.0) treats Proxy-Connection as Connection,
            # which the framing checks ignore. After a response that it
            # considers the last, it rejects every later byte ("Data after
            # `Connection: close`"), so the next response would get 502.
            self.keep_alive = False
        # Detach now, so that bytes after the response in this read reach no
        # exchange; the pool decision is made after the read in `_complete`.
        self.exchange = None
        self._finished = exchange

    # used by the exchange

    def send(self, data: bytes) -> None:
        """Write request bytes; a closed connection drops them silently."""
        write = self._write
        if write is not None and not self.closed:
            self.bytes_sent = True
            write(data)

    def send_parts(self, parts: Sequence[bytes]) -> None:
        """Write several request buffers in order without joining them."""
        if self.transport is not None and not self.closed:
            self.bytes_sent = True
            self.transport.writelines(parts)

    def start(self, exchange: Exchange, head_only: bool) -> None:
        """Attach the connection to an exchange for one request."""
        self.exchange = exchange
        self.head_only = head_only
        self.bytes_sent = False
        self.response_started = False
        self.keep_alive = True
        self.max_head = self.pool.max_response_head
        self._body_left = 0

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

    def is_reusable(self, idle_for: float) -> bool:
        """Return whether the connection can carry another request.

        EOF, errors and stray bytes that the loop has already read mark the
        connection (eof_received, connection_lost, data_received). What
        arrived since the loop's last poll is found only by a MSG_PEEK. That
        costs a syscall, so it is made only for a connection idle for
        PEEK_AFTER_IDLE or longer. Upstreams close idle connections after
        their keep-alive timeout (nginx 75 s, Apache httpd 5 s by default),
        and a close announced in a response has already cleared
        `keep_alive`.
        """
        if self.closed or self.sock is None or not self.keep_alive:
            return False
        is_closing = self._is_closing
        if is_closing is None or is_closing():
            return False
        if idle_for < PEEK_AFTER_IDLE:
            return True
        try:
            waiting = self.sock.recv(1, _PEEK_FLAGS)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        # b"" is the upstream's FIN; any byte is a response nobody asked for.
        del waiting
        return False

    def write_eof(self) -> bool:
        """Close the write side after the buffered bytes, and return True.

        Returns False for a TLS connection, because asyncio's TLS transports
        cannot close only their write side.
        """
        transport = self.transport
        if self.closed or transport is None or not transport.can_write_eof():
            return False
        transport.write_eof()
        return True

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
                pooled_before_response=self.reused > 0 and not self.response_started,
            )
            exchange.on_upstream_failed(error)


def _head_start(data: bytes, heads: int) -> int:
    """Return the offset in `data` of the last of the `heads` heads begun in it.

    llhttp (httptools 0.9.0) requires CRLF line ends and skips CR and LF
    before a message, so each head runs from its first other byte to the
    first CRLF CRLF. The heads before the last one are 1xx heads, which
    have no body. A stray head after a final response is the exception,
    and its offset may be wrong, but such a connection is closed anyway.
    """
    start = 0
    for i in range(heads):
        while start < len(data) and (data[start] == 13 or data[start] == 10):
            start += 1
        if i < heads - 1:
            start = data.find(_HEAD_END, start) + 4
    return start
