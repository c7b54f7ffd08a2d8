"""A bare keep-alive HTTP/1.1 reverse proxy that exists only for the benchmark.

It shows what the stack pgproxy is built on (uvloop, httptools and asyncio
Protocols) can do with the minimum a proxy must do. It parses each request
head, forwards it to one fixed upstream, parses the response head and relays
both bodies. It shares no proxy code with pgproxy, only its glibc malloc
settings and write buffer limits, so pgproxy's own cost is its measured cost
minus this one. It is not part of pgproxy and must never serve real traffic.

    python bench/bare_proxy.py --upstream 127.0.0.1:8080 [--port 0]

When it listens, it writes `bare proxy listening on 127.0.0.1:PORT` to stderr.
SIGTERM or SIGINT stops it with exit code 0.

Each downstream connection takes one upstream connection from a shared pool
of idle ones (or opens one) and keeps it until the downstream connection
closes, unless the upstream closes it first. Requests on a downstream
connection go upstream in order and the
responses come back in the same order. Bodies framed by Content-Length are
relayed as they arrive; chunked bodies are re-chunked, without trailers. The
Connection, Keep-Alive, Proxy-Connection, TE and Upgrade headers are dropped,
because they are hop-by-hop (RFC 9110, section 7.6.1). Only
`Connection: close` is added towards a client that asked to close.

NOTE: there is no routing, no timeout, no X-Forwarded-For, and headers listed
in a Connection header are not removed. HEAD requests, 1xx responses and
protocol upgrades are not handled, and HTTP/1.0 clients get HTTP/1.1 replies.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections import deque
from typing import cast

import httptools
import uvloop

from pgproxy.server.allocator import tune_allocator

HOP_BY_HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade")
)
MAX_IDLE_UPSTREAMS = 128
# The write buffer limits pgproxy sets, so that both relay bodies in pieces
# of the same size.
WRITE_BUFFER_HIGH = 256 * 1024
WRITE_BUFFER_LOW = 64 * 1024
LAST_CHUNK = b"0\r\n\r\n"


def error_response(status: bytes) -> bytes:
    """Return a complete response with an empty body that closes the connection."""
    return b"HTTP/1.1 %b\r\ncontent-length: 0\r\nconnection: close\r\n\r\n" % status


class Relay(asyncio.Protocol):
    """The parsing state both sides share: the head's headers and bytes to relay."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.headers: list[bytes] = []
        self.chunked = False

    def take_out(self) -> bytes:
        """Return the bytes collected for the other side, and forget them."""
        out, self.out = self.out, []
        return out[0] if len(out) == 1 else b"".join(out)

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered in HOP_BY_HOP:
            return
        if lowered == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True
        self.headers.append(b"%b: %b\r\n" % (name, value))

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            # One chunk per piece received (RFC 9112, section 7.1).
            body = b"%x\r\n%b\r\n" % (len(body), body)
        self.out.append(body)


class Pool:
    """The upstream address and the idle upstream connections to it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.idle: list[Upstream] = []

    def __repr__(self) -> str:
        return f"Pool({self.host}:{self.port}, idle={len(self.idle)})"

    def acquire(self, downstream: Downstream) -> Upstream:
        """Return an idle connection, or one that buffers writes until connected."""
        upstream = self.idle.pop() if self.idle else Upstream(self)
        upstream.downstream = downstream
        if upstream.transport is None:
            loop = asyncio.get_running_loop()
            task = loop.create_task(
                loop.create_connection(lambda: upstream, self.host, self.port)
            )
            task.add_done_callback(upstream.connect_done)
        return upstream

    def release(self, upstream: Upstream) -> None:
        """Keep `upstream` for the next downstream connection, or close it."""
        upstream.downstream = None
        if upstream.reusable and len(self.idle) < MAX_IDLE_UPSTREAMS:
            upstream.set_reading(True)
            self.idle.append(upstream)
        else:
            upstream.close()


class Upstream(Relay):
    """One connection to the upstream: sends requests, relays responses."""

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.downstream: Downstream | None = None
        self.pending: list[bytes] = []
        self.reading = True
        self.reusable = True
        self.head_sent = False
        self.reason = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        if not self.reusable:
            self.transport.close()  # the client closed while this one was opening
        elif self.pending:
            self.transport.write(b"".join(self.pending))
            self.pending.clear()

    def connect_done(self, task: asyncio.Task[object]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.reusable = False
            if self.downstream is not None:
                self.downstream.upstream_lost(head_sent=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.downstream is not None:
            self.downstream.upstream_lost(self.head_sent)

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self.pending.append(data)
        else:
            self.transport.write(data)

    def close(self) -> None:
        self.reusable = False
        self.downstream = None
        if self.transport is not None:
            self.transport.close()

    def set_reading(self, reading: bool) -> None:
        if self.transport is not None and reading != self.reading:
            self.reading = reading
            if reading:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            # connection_lost then reports the loss to the client connection.
            self.reusable = False
            if self.transport is not None:
                self.transport.close()
        if self.out:
            self.flush()

    def flush(self) -> None:
        out = self.take_out()
        if self.downstream is not None:
            self.downstream.transport.write(out)

    def pause_writing(self) -> None:
        if self.downstream is not None:
            self.downstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.downstream is not None and not self.downstream.closing:
            self.downstream.transport.resume_reading()

    # httptools callbacks, in the order the parser calls them.

    def on_message_begin(self) -> None:
        self.reason = b""
        self.headers = []
        self.chunked = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_headers_complete(self) -> None:
        if self.downstream is None:
            return
        status = self.parser.get_status_code()
        self.out.append(b"HTTP/1.1 %d %b\r\n" % (status, self.reason))
        self.out.append(b"".join(self.headers))
        if not self.downstream.keep_alive[0]:
            self.out.append(b"connection: close\r\n")
        self.out.append(b"\r\n")
        self.head_sent = True

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out.append(LAST_CHUNK)
        # Written now, because the client connection may close right after.
        self.flush()
        self.head_sent = False
        if self.downstream is not None:
            self.downstream.response_done(self.parser.should_keep_alive())


class Downstream(Relay):
    """One client connection: parses requests and forwards them upstream."""

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: Upstream | None = None
        # One entry per request sent upstream whose response is not complete,
        # telling whether the client connection stays open after the response.
        self.keep_alive: deque[bool] = deque()
        self.closing = False
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        self.upstream = self.pool.acquire(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        upstream, self.upstream = self.upstream, None
        if upstream is None:
            return
        if self.keep_alive or upstream.transport is None:
            upstream.close()  # mid-response or still connecting: not reusable
        else:
            self.pool.release(upstream)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            # A 400 response would be taken as the response to an earlier
            # request whose response is still in flight.
            self.close(b"" if self.keep_alive else error_response(b"400 Bad Request"))
            return
        if self.out and self.upstream is not None:
            self.upstream.send(self.take_out())

    def close(self, last_response: bytes = b"") -> None:
        """Write `last_response`, then close the client connection."""
        if last_response:
            self.transport.write(last_response)
        self.closing = True
        self.transport.close()

    def upstream_lost(self, head_sent: bool) -> None:
        self.upstream = None
        if not self.keep_alive:
            return  # the next request opens another upstream connection
        # Closing delimits a response that carries no length of its own.
        self.close(b"" if head_sent else error_response(b"502 Bad Gateway"))

    def response_done(self, upstream_keep_alive: bool) -> None:
        if not upstream_keep_alive and self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if not self.keep_alive.popleft():
            self.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.set_reading(False)

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.set_reading(True)

    # httptools callbacks, in the order the parser calls them.

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.chunked = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_headers_complete(self) -> None:
        if self.upstream is None:
            self.upstream = self.pool.acquire(self)
        self.keep_alive.append(self.parser.should_keep_alive())
        method = self.parser.get_method()
        self.out.append(b"%b %b HTTP/1.1\r\n" % (method, self.url))
        self.out.append(b"".join(self.headers))
        self.out.append(b"\r\n")

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out.append(LAST_CHUNK)
        if not self.keep_alive[-1]:
            # The client closes after this request, so stop reading.
            self.closing = True
            self.transport.pause_reading()


async def serve(upstream_host: str, upstream_port: int, port: int) -> None:
    """Listen on 127.0.0.1:`port` and proxy to the upstream until SIGTERM."""
    loop = asyncio.get_running_loop()
    pool = Pool(upstream_host, upstream_port)
    server = await loop.create_server(
        lambda: Downstream(pool), "127.0.0.1", port, backlog=1024
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"bare proxy listening on 127.0.0.1:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str]) -> int:
    """Parse the command line and run the proxy; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python bench/bare_proxy.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--upstream", required=True, help="upstream address as HOST:PORT"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port to listen on (default 0: any)"
    )
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--upstream must be HOST:PORT, got {args.upstream!r}")
    # The same glibc malloc settings as pgproxy, which keep large body reads
    # from paying for fresh pages each time.
    tune_allocator()
    uvloop.run(serve(host, int(port), args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
