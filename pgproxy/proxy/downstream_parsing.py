"""Request parsing of a client connection: llhttp callbacks and head checks.

Invariants:
- An exchange starts (route, pick, connect) only after the read that
  completed its head has been parsed without error, so a request whose
  head or first body bytes are malformed is answered with 4xx and never
  reaches an upstream.
- The request line has exactly one SP between its parts, and the head and
  body stay within the listener's size limits; anything else is rejected
  before an exchange exists.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Final

import httptools

from pgproxy.proxy.downstream_state import (
    _HEADER,
    _IDLE,
    _NO_HEADERS,
    _NO_NAMES,
    _PAUSE_PIPELINE,
    DownstreamState,
)
from pgproxy.proxy.exchange import Exchange
from pgproxy.proxy.framing import FramingError, check_request_head, lower_field_name

if TYPE_CHECKING:
    from pgproxy.proxy.downstream import DownstreamProtocol

logger = logging.getLogger(__name__)

_TOKEN_AND_SPACE_RE: Final = re.compile(rb"^(?:\r\n)*[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ")


class RequestParsing(DownstreamState):
    """Feeds client bytes to llhttp and queues each checked request head."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self._tunnel is not None:
            self._tunnel_last = self.clock()
            self._tunnel.on_tunnel_client_data(data)
            return
        self._feeding = True
        self._chunk = data
        self._scan_from = 0
        in_body = self._in_message and not self._in_head
        self._read_at_message_start = not self._in_message
        self._body_in_read = False
        self._head_began_in_read = False
        self._read_body_bytes = 0
        try:
            error = self._feed(data)
        finally:
            self._feeding = False
            self._chunk = b""
        # Only a read inside one message's body is counted. A read that ends
        # one message and begins the next also carries the end of the first
        # and the head of the next, and neither is the next message's framing.
        in_one_body = in_body and not self._head_began_in_read
        if error is None and in_one_body and self._in_message and not self._in_head:
            error = self._count_framing(len(data) - self._read_body_bytes)
        if error is not None:
            self._reject(*error)
        elif self._in_head:
            # A read may end one head, carry a body and begin the next head.
            # Only the bytes of the head still open count and are carried.
            if self._head_began_in_read:
                self._carry = bytearray(data[self._scan_from :])
                self._carry_anywhere = self._body_in_read
            else:
                self._head_bytes += len(data)
                self._carry += data
            if max(self._head_bytes, self._header_bytes) > self.limits.max_header_bytes:
                self._reject(431, "request header fields too large")
        self._run_queue()

    def _count_framing(self, extra: int) -> tuple[int, str] | None:
        """Count the bytes of a body read that were not body, and reject a flood.

        A read that began and ended inside one message's body carries only
        its body and its framing: chunk sizes, chunk extensions, CRLFs and
        trailer fields. llhttp skips extensions and pgproxy drops trailers,
        so neither has a limit of its own. Each message may carry 32 bytes
        of framing per chunk, plus max_header_bytes for the rest.
        """
        self._extra_bytes += extra
        if self._extra_bytes > self.limits.max_header_bytes + 32 * self._chunks:
            return 400, "malformed request: chunk extensions or trailers too large"
        return None

    def _feed(self, data: bytes) -> tuple[int, str] | None:
        """Parse bytes; return the status and reason of a malformed request."""
        try:
            self._feed_data(data)
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
        self._head_began_in_read = True
        self._in_message = True
        self._head_bytes = 0
        self._url = b""
        self._headers = []
        self._header_names = []
        self._header_bytes = 0
        self._chunks = 0
        self._extra_bytes = 0
        if self._conn_deadline_kind == _IDLE:
            self._set_conn_deadline(_HEADER, self.limits.header_read_timeout)

    def on_url(self, url: bytes) -> None:
        # llhttp reports a target split over reads in parts; most come whole.
        self._url = self._url + url if self._url else url
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field of a chunked body: not forwarded
        self._headers.append((name, value))
        self._header_names.append(lower_field_name(name))
        self._header_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._conn_deadline = 0.0
        self._conn_deadline_kind = 0
        if self._header_bytes > self.limits.max_header_bytes:
            raise FramingError("request header fields too large", status=431)
        method = self._get_method()
        version = self._check_request_line(method)
        if version is None:
            # httptools formats the version with str.format: about 2,300
            # instructions, against about 100 for reading it from the chunk.
            version = self._parser.get_http_version()
        names = self._header_names
        info = check_request_head(method, self._url, version, self._headers, names)
        limit = self.limits.max_body_bytes
        if limit and info.content_length is not None and info.content_length > limit:
            raise FramingError("request body too large", status=413)
        # Only DownstreamProtocol, which adds no state, derives from this class.
        # An annotation, not cast(), which would be one more call per request.
        downstream: DownstreamProtocol = self  # type: ignore[assignment]
        exchange = Exchange(
            downstream, method, self._headers, names, info, version == "1.0"
        )
        # The exchange owns the head now; an idle connection keeps none of it.
        self._headers = _NO_HEADERS
        self._header_names = _NO_NAMES
        self._url = b""
        if self._queue:
            self._pause(_PAUSE_PIPELINE)
        self._queue.append(exchange)
        self._receiving = exchange

    def _check_request_line(self, method: bytes) -> str | None:
        """Check the request line; return its version when the read proves it.

        RFC 9112 section 3 puts exactly one SP between the parts of the
        request line. llhttp accepts several, and a proxy must not be more
        lenient than the servers behind it.
        """
        line = b"%b %b HTTP/" % (method, self._url)
        if self._carry:
            carried_bytes = len(self._carry)
            carried = bytes(self._carry + self._chunk)
            index = _find_line(carried, line, 0, self._carry_anywhere)
            self._carry = bytearray()
            if index < 0:
                raise FramingError("invalid request line")
            # A later head of this read is searched for after this line.
            self._scan_from = max(0, index + len(line) - carried_bytes)
            return None
        chunk = self._chunk
        start = self._scan_from
        # Most heads are the first bytes of their read. startswith is then a C
        # call in compiled code, where find with a start is a method call.
        if start == 0 and chunk.startswith(line):
            index = 0
        else:
            index = _find_line(chunk, line, start, self._body_in_read)
            if index < 0:
                raise FramingError("invalid request line")
        end = index + len(line)
        self._scan_from = end
        at_message_start = self._read_at_message_start
        self._read_at_message_start = False
        # The bytes after "HTTP/" are this message's version only when the read
        # began between two messages and `line` is at its offset 0. llhttp then
        # parsed this message from the first byte of the read, so its method,
        # one SP, its target, one SP and "HTTP/" come right before the version.
        # A later head of the same read, a head continued from an earlier read
        # or a line found further on (inside a body, say) may be other bytes,
        # so llhttp is asked for those.
        if index != 0 or not at_message_start or len(chunk) < end + 5:
            return None
        if chunk[end] != 0x31 or chunk[end + 1] != 0x2E:  # "1."
            return None
        if chunk[end + 3] != 0x0D or chunk[end + 4] != 0x0A:  # CRLF
            return None
        minor = chunk[end + 2]
        if minor == 0x31:
            return "1.1"
        if minor == 0x30:
            return "1.0"
        return None

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_body(self, body: bytes) -> None:
        self._body_in_read = True
        self._read_body_bytes += len(body)
        exchange = self._receiving
        if exchange is None:
            return
        limit = self.limits.max_body_bytes
        if limit and exchange.bytes_in + len(body) > limit:
            raise FramingError("request body too large", status=413)
        exchange.on_request_body(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        exchange, self._receiving = self._receiving, None
        if exchange is not None:
            exchange.on_request_complete()

    def _on_upgrade_request(self, rest: bytes) -> None:
        exchange = self._queue[-1] if self._queue else None
        if exchange is not None and rest:
            exchange.early_data += rest
        # Bytes after an upgrade request belong to the new protocol, or to
        # nothing if the upstream refuses: stop parsing HTTP on this connection.
        self._pause(_PAUSE_PIPELINE)


def _find_line(data: bytes, line: bytes, start: int, anywhere: bool) -> int:
    """Return the offset of the request line `line` in `data`, or -1.

    Without a body byte in `data` before it, a request line starts the data
    or follows an LF, because only heads and empty lines come before it.
    The same bytes inside a field value do not, so `GET  /x HTTP/1.1` cannot
    pass by repeating `GET /x HTTP/1.1` in a header. After a body the next
    request line may follow any byte, and `anywhere` accepts any offset.
    """
    # NOTE: after a body in the same read, a request line with extra SP still
    # passes when its one-SP form appears in that body or in a field value.
    # httptools reports no offsets that would locate the real line.
    index = data.find(line, start)
    if anywhere:
        return index
    while index > 0 and data[index - 1] != 0x0A:
        index = data.find(line, index + 1)
    return index


def _parser_error_status(exc: httptools.HttpParserError) -> int:
    if "Invalid HTTP version" in str(exc):
        return 505
    return 400
