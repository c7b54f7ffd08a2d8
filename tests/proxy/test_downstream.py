"""Protocol tests of the client side: framing, pipelining, limits, timeouts."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from pgproxy.observability.metrics import Metrics
from pgproxy.proxy.downstream import DownstreamProtocol
from pgproxy.proxy.service import ProxyService
from tests.proxy.loopback import (
    ScriptedUpstream,
    exchange,
    make_graph,
    read_response,
    running_proxy,
    wait_for_zero,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def echo_target(head: bytes) -> bytes | None:
    target = head.split(b" ", 2)[1]
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(target)
    # RFC 9110 section 9.3.2: a response to HEAD ends with its header block.
    return reply if head.startswith(b"HEAD ") else reply + target


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    server = ScriptedUpstream(reply=echo_target)
    await server.start()
    yield server
    await server.stop()


async def test_pipelined_requests_answered_in_order(upstream: ScriptedUpstream) -> None:
    requests = b"".join(
        b"GET /r%d HTTP/1.1\r\nHost: a\r\n\r\n" % index for index in range(5)
    )
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(requests)
        with anyio.fail_after(5):
            bodies = [
                (await read_response(reader)).split(b"\r\n\r\n")[1] for _ in range(5)
            ]
        writer.close()
    assert bodies == [b"/r%d" % index for index in range(5)]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"GET  /x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        # The single-SP form of the line appears in a field value only.
        (b"GET  /x HTTP/1.1\r\nX: GET /x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /x  HTTP/1.1\r\nHost: a\r\nX: GET /x HTTP/1.1\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
        (
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nabc\r\n0\r\n\r\n",
            400,
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
        ),
        (b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n", 413),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
)
async def test_malformed_request_rejected_before_upstream(
    upstream: ScriptedUpstream, request_bytes: bytes, status: int
) -> None:
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reply = await exchange(port, request_bytes, until_close=True)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:200]
    assert b"Connection: close\r\n" in reply
    assert upstream.heads == []
    assert upstream.connections == 0


async def test_request_right_after_body_accepted(upstream: ScriptedUpstream) -> None:
    """A pipelined request line may follow a body's last byte directly."""
    post = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post + b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        with anyio.fail_after(5):
            first = await read_response(reader)
            second = await read_response(reader)
        writer.close()
    assert first.endswith(b"/p")
    assert second.startswith(b"HTTP/1.1 200 ")
    assert second.endswith(b"/after")


async def test_header_read_timeout_is_408(upstream: ScriptedUpstream) -> None:
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reply = await exchange(
            port, b"GET /x HTTP/1.1\r\nHost: a\r\n", until_close=True
        )
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert upstream.heads == []


async def test_head_response_has_no_body_and_keeps_connection(
    upstream: ScriptedUpstream,
) -> None:
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD /abc HTTP/1.1\r\nHost: a\r\n\r\n")
        with anyio.fail_after(5):
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
            second = await read_response(reader)
        writer.close()
    assert b"Content-Length: 4\r\n" in head
    assert second.startswith(b"HTTP/1.1 200 OK")
    assert second.endswith(b"/next"), "the HEAD reply must not carry a body"
    assert upstream.connections == 1


async def test_expect_continue_then_body(upstream: ScriptedUpstream) -> None:
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        with anyio.fail_after(5):
            interim = await reader.readuntil(b"\r\n\r\n")
            writer.write(b"hello")
            final = await read_response(reader)
        writer.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final.startswith(b"HTTP/1.1 200 OK")
    assert b"expect" not in upstream.heads[0].lower()


async def test_http10_client_gets_close_delimited_body() -> None:
    upstream = ScriptedUpstream()

    async def chunked(head: bytes) -> bytes | None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head + b"3\r\nabc\r\n0\r\n\r\n"

    upstream.reply = chunked
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reply = await exchange(port, b"GET /x HTTP/1.0\r\n\r\n", until_close=True)
        chunked_reply = await exchange(
            port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", until_close=False
        )
    await upstream.stop()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert b"Connection: close" in head
    assert body == b"abc"
    assert b"Transfer-Encoding: chunked" in chunked_reply


async def test_fixed_response_route(upstream: ScriptedUpstream) -> None:
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reply = await exchange(port, b"GET /fixed HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert reply.endswith(b"\r\n\r\nfixed")
    assert upstream.heads == []


async def test_idle_client_closed_on_drain(upstream: ScriptedUpstream) -> None:
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        with anyio.fail_after(5):
            await read_response(reader)
        service.start_draining()
        with anyio.fail_after(5):
            assert await reader.read() == b""
        writer.close()


async def test_drain_end_cancels_busy_exchange() -> None:
    release = asyncio.Event()

    async def stuck(head: bytes) -> bytes | None:
        await release.wait()
        return None

    upstream = ScriptedUpstream(reply=stuck)
    await upstream.start()
    metrics = Metrics()
    try:
        async with running_proxy(make_graph([upstream.port])) as (port, service):
            service.current.metrics = metrics.bind_graph(service.current.graph)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            await wait_until(lambda: upstream.heads)
            (conn,) = service.connections
            assert isinstance(conn, DownstreamProtocol)
            front = conn._queue[0]

            assert service.abort_all("drain_timeout") == 1
            assert front.failure == "drain_timeout"
            assert front.status == 499
            with anyio.fail_after(5):
                # A reset, so the read fails or ends without a response.
                try:
                    assert await reader.read() == b""
                except ConnectionResetError:
                    pass
            writer.close()
    finally:
        release.set()
        await upstream.stop()
    statuses = [stats.statuses for stats in metrics.snapshot().requests.values()]
    assert {499: 1} in statuses


class VersionCountingParser:
    """Wraps a connection's llhttp parser and counts get_http_version calls."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.version_calls = 0

    def feed_data(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def get_method(self) -> bytes:
        return bytes(self.parser.get_method())

    def get_http_version(self) -> str:
        self.version_calls += 1
        return str(self.parser.get_http_version())


async def wait_until(condition: Callable[[], object]) -> None:
    """Poll `condition` until it is true, for at most 5 seconds."""
    with anyio.fail_after(5):
        while not condition():  # noqa: ASYNC110 (state of another task)
            await anyio.sleep(0.005)


async def counting_connection(
    port: int, service: ProxyService
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any, VersionCountingParser]:
    """Connect to the proxy; return the streams, its protocol and a counter."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await wait_until(lambda: service.connections)
    (protocol,) = service.connections
    counter = VersionCountingParser(protocol._parser)
    protocol._parser = counter
    return reader, writer, protocol, counter


async def test_version_read_from_request_line(upstream: ScriptedUpstream) -> None:
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reader, writer, _, counter = await counting_connection(port, service)
        writer.write(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        with anyio.fail_after(5):
            first = await read_response(reader)
            # HTTP/1.0 needs no Host: read as 1.1, this request would get 400.
            writer.write(b"GET /two HTTP/1.0\r\n\r\n")
            second = await reader.read(-1)
        writer.close()
    assert first.startswith(b"HTTP/1.1 200 ")
    assert second.startswith(b"HTTP/1.1 200 ")
    assert second.endswith(b"/two")
    assert counter.version_calls == 0


async def test_version_of_pipelined_request_from_parser(
    upstream: ScriptedUpstream,
) -> None:
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reader, writer, _, counter = await counting_connection(port, service)
        writer.write(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.0\r\n\r\n")
        with anyio.fail_after(5):
            first = await read_response(reader)
            second = await reader.read(-1)
        writer.close()
    assert first.endswith(b"/one")
    assert second.startswith(b"HTTP/1.1 200 ")
    assert second.endswith(b"/two")
    assert counter.version_calls == 1


async def test_version_after_empty_lines_from_parser(
    upstream: ScriptedUpstream,
) -> None:
    # RFC 9112 section 2.2 lets a server skip empty lines before a request
    # line, so the line is not at offset 0 of the read.
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reader, writer, _, counter = await counting_connection(port, service)
        writer.write(b"\r\nGET /late HTTP/1.0\r\n\r\n")
        with anyio.fail_after(5):
            reply = await reader.read(-1)
        writer.close()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b"/late")
    assert counter.version_calls == 1


async def test_version_of_split_request_line_from_parser(
    upstream: ScriptedUpstream,
) -> None:
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reader, writer, protocol, counter = await counting_connection(port, service)
        writer.write(b"GET /split HTTP/1.")
        await wait_until(lambda: protocol._in_head)
        writer.write(b"0\r\n\r\n")
        with anyio.fail_after(5):
            reply = await reader.read(-1)
        writer.close()
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b"/split")
    assert counter.version_calls == 1


async def test_request_line_in_body_ignored(
    upstream: ScriptedUpstream,
) -> None:
    # The body contains a request line with the same method and target as the
    # request after it, so a search for that line finds the body first.
    body = b"GET / HTTP/1.0\r\n"
    post = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reader, writer, _, counter = await counting_connection(port, service)
        writer.write(post + body + b"GET / HTTP/1.1\r\n\r\n")
        with anyio.fail_after(5):
            first = await read_response(reader)
            second = await reader.read(-1)
        writer.close()
    assert first.endswith(b"/p")
    assert second.startswith(b"HTTP/1.1 400 "), "an HTTP/1.1 request needs a Host"
    assert b"missing Host" in second
    assert counter.version_calls == 1
    assert len(upstream.heads) == 1


async def test_request_line_starting_body_read(
    upstream: ScriptedUpstream,
) -> None:
    body = b"GET / HTTP/1.0\r\n"
    post = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reader, writer, _, counter = await counting_connection(port, service)
        writer.write(post)
        await wait_until(lambda: upstream.heads)
        # This read starts inside the body, with bytes shaped as a request line.
        writer.write(body + b"GET / HTTP/1.1\r\n\r\n")
        with anyio.fail_after(5):
            first = await read_response(reader)
            second = await reader.read(-1)
        writer.close()
    assert first.endswith(b"/p")
    assert second.startswith(b"HTTP/1.1 400 "), "an HTTP/1.1 request needs a Host"
    assert counter.version_calls == 1


@pytest.mark.parametrize("body_size", [3, 70_000], ids=["small", "over-head-limit"])
async def test_pipelined_head_split_after_body(
    upstream: ScriptedUpstream, body_size: int
) -> None:
    # The middle read ends one head, carries its whole body and starts the
    # next head, which ends in the last read. The next head is checked on its
    # own bytes: the body before it is no part of its request line, and does
    # not count against max_header_bytes (64 KiB by default).
    post = b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % body_size
    cut = post.index(b"Length")
    body = b"b" * body_size
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reader, writer, protocol, _ = await counting_connection(port, service)
        writer.write(post[:cut])
        await wait_until(lambda: protocol._in_head)
        writer.write(post[cut:] + body + b"GET /after HT")
        await wait_until(lambda: upstream.heads)
        writer.write(b"TP/1.1\r\nHost: a\r\n\r\n")
        with anyio.fail_after(5):
            first = await read_response(reader)
            second = await read_response(reader)
        writer.close()
    assert first.endswith(b"/p")
    assert second.startswith(b"HTTP/1.1 200 "), second
    assert second.endswith(b"/after")


async def test_lost_connections_are_freed_without_the_cyclic_gc(
    upstream: ScriptedUpstream,
) -> None:
    # The parser and the transport hold the protocol. A protocol that kept
    # them after connection_lost would stay alive in reference cycles, which
    # only the cyclic GC frees, and the GC is off here.
    def live() -> int:
        return sum(isinstance(obj, DownstreamProtocol) for obj in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        async with running_proxy(make_graph([upstream.port])) as (port, _):
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                with anyio.fail_after(5):
                    await read_response(reader)
                    assert await reader.read() == b""
                writer.close()
                await writer.wait_closed()
            assert await wait_for_zero(live) == 0
    finally:
        gc.enable()
