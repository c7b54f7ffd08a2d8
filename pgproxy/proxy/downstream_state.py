"""The fields of one client connection, shared by the modules that drive it.

`DownstreamState` declares every attribute of a client connection in
`__slots__`. The behaviour is in `DownstreamProtocol`
(pgproxy/proxy/downstream.py: lifecycle, request queue, writes, deadlines) and
its base `RequestParsing` (pgproxy/proxy/downstream_parsing.py: llhttp
callbacks and request head checks), which adds no slots. Methods one module
calls on the other are declared here for the type checker only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import httptools

from pgproxy.graph.types import Listener
from pgproxy.observability.metrics import ConnectionStats
from pgproxy.proxy.headers import Forwarding

if TYPE_CHECKING:
    from pgproxy.proxy.exchange import Exchange
    from pgproxy.proxy.service import ProxyService

_PAUSE_BODY: Final = 1
_PAUSE_PIPELINE: Final = 2
_IDLE: Final = 1
_HEADER: Final = 2
_TUNNEL: Final = 3
# Seconds a connection closed mid-request keeps reading before it closes.
LINGER_TIMEOUT: Final = 5.0
# Shared and never appended to: on_header appends only inside a head, and
# on_message_begin gives each head a list of its own.
_NO_HEADERS: Final[list[tuple[bytes, bytes]]] = []
_NO_NAMES: Final[list[bytes]] = []
# The parser of every lost connection: never fed, and holding no protocol.
_LOST_PARSER: Final = httptools.HttpRequestParser(object())


def _ignore_bytes(data: bytes) -> None:
    """Stand in for the parser's feed_data after the connection is lost."""


def _no_method() -> bytes:
    """Stand in for the parser's get_method after the connection is lost."""
    return b""


class DownstreamState(asyncio.Protocol):
    """The state of one client connection; see `DownstreamProtocol`."""

    # With this many attributes CPython 3.11 stops sharing dict keys, so each
    # connection would carry a dict of its own (1.6 KiB measured, 3.11.7).
    __slots__ = (
        "_body_in_read",
        "_carry",
        "_carry_anywhere",
        "_chunk",
        "_chunks",
        "_close_when_done",
        "_closed",
        "_conn_deadline",
        "_conn_deadline_kind",
        "_connection_stats",
        "_eof",
        "_error",
        "_extra_bytes",
        "_feed_data",
        "_feeding",
        "_front_started",
        "_get_method",
        "_head_began_in_read",
        "_head_bytes",
        "_header_bytes",
        "_header_names",
        "_headers",
        "_in_head",
        "_in_message",
        "_lingering",
        "_parser",
        "_paused",
        "_queue",
        "_read_at_message_start",
        "_read_body_bytes",
        "_receiving",
        "_scan_from",
        "_send_wait",
        "_starting",
        "_timer",
        "_timer_at",
        "_tls",
        "_tunnel",
        "_tunnel_last",
        "_url",
        "_write",
        "client",
        "client_ip",
        "clock",
        "forwarding",
        "limits",
        "listener_name",
        "loop",
        "service",
        "transport",
    )

    def __init__(
        self,
        service: ProxyService,
        listener: Listener,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.service = service
        self.listener_name = listener.name
        self.limits = listener.settings
        # asyncio.get_running_loop() makes a getpid(2) call on Linux, so the
        # protocol factory passes the loop it took once.
        self.loop = asyncio.get_running_loop() if loop is None else loop
        # Bound methods of the loop, parser and transport, taken once. Compiled
        # code calls a method of a Python object by name, with a type lookup
        # per call, and a stored bound method skips that lookup.
        self.clock: Callable[[], float] = self.loop.time
        self.transport: asyncio.Transport | None = None
        self._write: Callable[[bytes], object] | None = None
        self.client = ""
        self.client_ip = ""
        self.forwarding = Forwarding("", b"http", False)
        self._parser = httptools.HttpRequestParser(self)
        self._feed_data: Callable[[bytes], None] = self._parser.feed_data
        self._get_method: Callable[[], bytes] = self._parser.get_method
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
        # Closed for writing, and discarding what the client still sends.
        self._lingering = False
        self._close_when_done = False
        self._eof = False
        self._tls = False
        self._paused = 0
        self._in_head = False
        # From llhttp's on_message_begin to its on_message_complete.
        self._in_message = False
        self._read_at_message_start = False
        self._head_bytes = 0
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = _NO_HEADERS
        self._header_names: list[bytes] = _NO_NAMES
        self._header_bytes = 0
        self._error: tuple[int, str] | None = None
        # Raw bytes of the read being parsed, and of a head split over reads,
        # to check the request line llhttp parses leniently.
        self._chunk = b""
        self._scan_from = 0
        self._carry = bytearray()
        # Whether a body byte came in the read being parsed, and in the read
        # that began the carried head: the request line check needs to know.
        self._body_in_read = False
        self._carry_anywhere = False
        # Whether the head being read, if any, began in the read being parsed.
        self._head_began_in_read = False
        # Body bytes of the read being parsed.
        self._read_body_bytes = 0
        # The chunks of the message being read, and the bytes of its body
        # reads that were not body (chunk sizes, extensions, CRLFs, trailers).
        self._chunks = 0
        self._extra_bytes = 0
        self._conn_deadline = 0.0
        self._conn_deadline_kind = 0
        # When tunnel bytes last passed in either direction (loop time).
        self._tunnel_last = 0.0
        # While pgproxy waits for the client to read (write buffer above its
        # high-water mark, or closed with bytes unsent): the loop time when the
        # send timeout passes, and the bytes the client had not taken when
        # that period began. One slot keeps each connection 8 bytes smaller
        # than two fields would, and only pause_writing, close and the timer
        # read it.
        self._send_wait: tuple[float, int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def _release_references(self) -> None:
        """Drop the parser and the transport once the connection is lost.

        Both contain references to this protocol (the parser through bound
        methods of its callbacks). Keeping them would leave 16 objects per
        closed connection in reference cycles, which only the cyclic GC frees.
        """
        self.transport = None
        self._write = None
        self._parser = _LOST_PARSER
        self._feed_data = _ignore_bytes
        self._get_method = _no_method

    def __repr__(self) -> str:
        return (
            f"<DownstreamProtocol {self.client} listener={self.listener_name} "
            f"queued={len(self._queue)} closed={self._closed}>"
        )

    # Implemented by DownstreamProtocol. Real methods, not declarations under
    # TYPE_CHECKING, so that mypyc compiles the calls through the class's vtable.

    def _run_queue(self) -> None:
        raise NotImplementedError

    def _reject(self, status: int, message: str) -> None:
        raise NotImplementedError

    def _pause(self, reason: int) -> None:
        raise NotImplementedError

    def _set_conn_deadline(self, kind: int, timeout: float) -> None:
        raise NotImplementedError
