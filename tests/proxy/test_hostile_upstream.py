"""Upstreams that send broken responses, over loopback sockets.

A response that fails after its head reached the client must reach the
client visibly cut. A chunked relay ends without the last chunk. A client
that reads the body until the connection closes (HTTP/1.0) gets a TCP
reset, because it takes a FIN for the end of the body.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

import anyio
import pytest

from tests.proxy.loopback import ScriptedUpstream, exchange, make_graph, running_proxy

pytestmark = pytest.mark.anyio

GET = b"GET /x HTTP/1.1\r\nHost: test.local\r\n\r\n"
GET_CLOSE = b"GET /x HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n"
GET_HTTP10 = b"GET /x HTTP/1.0\r\nHost: test.local\r\n\r\n"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
CLOSE_HEAD = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
# SO_LINGER on with a zero timeout: close() then sends a reset (socket(7)).
LINGER_ZERO = struct.pack("ii", 1, 0)

Script = Callable[[asyncio.StreamWriter], Awaitable[bool]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def scripted(script: Script) -> ScriptedUpstream:
    """Return an upstream that runs `script` on the connection of each request.

    The script writes the response itself and returns whether the
    connection stays open.
    """
    upstream = ScriptedUpstream()

    async def reply(head: bytes) -> bytes | None:
        keep_open = await script(upstream.writers[-1])
        return b"" if keep_open else None

    upstream.reply = reply
    return upstream


def in_parts(*parts: bytes, pause: float = 0.02) -> Script:
    """Return a script that writes `parts` as separate reads, keeping the connection."""

    async def script(writer: asyncio.StreamWriter) -> bool:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(pause)
        return True

    return script


def then_reset(*parts: bytes) -> Script:
    """Return a script that writes `parts`, then resets the connection."""

    async def script(writer: asyncio.StreamWriter) -> bool:
        await in_parts(*parts)(writer)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        writer.transport.abort()
        return True

    return script


async def read_until_closed(port: int, request: bytes) -> tuple[bytes, str]:
    """Send `request`, read until the proxy closes; return the bytes and how."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(request)
        with anyio.fail_after(5):
            while True:
                try:
                    data = await reader.read(65536)
                except ConnectionResetError:
                    return received, "reset"
                if not data:
                    return received, "eof"
                received += data
    finally:
        writer.close()


async def test_status_line_in_single_bytes() -> None:
    response = b"HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: 2\r\n\r\nok"
    bytewise = [response[i : i + 1] for i in range(len(response))]
    upstream = scripted(in_parts(*bytewise, pause=0.001))
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reply = await exchange(port, GET)
        idle = service.pools.all()[0].idle
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
    assert reply.endswith(b"\r\n\r\nok")
    assert idle == 1
    await upstream.stop()


async def test_head_over_limit_in_single_bytes() -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nX-A: " + b"v" * 1100 + b"\r\nContent-Length: 0\r\n\r\n"
    )
    bytewise = [response[i : i + 1] for i in range(len(response))]
    upstream = scripted(in_parts(*bytewise, pause=0.0))
    await upstream.start()
    graph = make_graph([upstream.port], max_response_header_bytes="1KiB")
    async with running_proxy(graph) as (port, service):
        reply = await exchange(port, GET)
        pool = service.pools.all()[0]
        idle, active = pool.idle, pool.active
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), reply
    assert b"response_header_too_large" in reply
    assert idle == 0
    assert active == 0
    await upstream.stop()


@pytest.mark.parametrize("pause", [0.0, 0.02], ids=["one-read", "separate-reads"])
async def test_continue_then_hints_then_final(pause: float) -> None:
    parts = (
        (CONTINUE, EARLY_HINTS, FINAL) if pause else (CONTINUE + EARLY_HINTS + FINAL,)
    )
    upstream = scripted(in_parts(*parts, pause=pause))
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        replies = [await exchange(port, GET_CLOSE, until_close=True) for _ in range(2)]
        idle = service.pools.all()[0].idle
    for reply in replies:
        # The upstream's 100 is not relayed: the request had no Expect.
        assert reply.startswith(EARLY_HINTS), reply
        assert reply.count(b"HTTP/1.1 ") == 2, reply
        assert reply.endswith(b"\r\n\r\nok")
    assert idle == 1
    assert upstream.connections == 1
    await upstream.stop()


@pytest.mark.parametrize(
    "script",
    [
        in_parts(CHUNKED_HEAD + b"5\r\nhello\r\n", b"zz\r\nworld\r\n0\r\n\r\n"),
        in_parts(CHUNKED_HEAD + b"5\r\nhello\r\n", b"1ffffffffffffffff\r\nx\r\n"),
        then_reset(CHUNKED_HEAD + b"5\r\nhello\r\n"),
        then_reset(CLOSE_HEAD + b"hello", b"world"),
    ],
    ids=["bad-chunk-size", "chunk-size-overflow", "chunked-reset", "close-reset"],
)
async def test_cut_body_resets_http10_client(
    script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    upstream = scripted(script)
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        received, ending = await read_until_closed(port, GET_HTTP10)
        pool = service.pools.all()[0]
        idle, active = pool.idle, pool.active
        address = f"127.0.0.1:{upstream.port}"
        failures = service.health.snapshot()["app"][address]["consecutive_failures"]
    assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
    assert ending == "reset", (
        "an HTTP/1.0 client reads the body until the connection closes, so a "
        f"cut body must end with a reset, not a FIN: {received!r}"
    )
    assert idle == 0
    assert active == 0
    assert failures == 1
    assert f"endpoint {address} failed mid-response" in caplog.text
    await upstream.stop()


async def test_reset_after_close_delimited_body_is_a_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    upstream = scripted(then_reset(CLOSE_HEAD + b"hello", b"world"))
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        received, _ = await read_until_closed(port, GET_CLOSE)
        address = f"127.0.0.1:{upstream.port}"
        failures = service.health.snapshot()["app"][address]["consecutive_failures"]
    assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
    assert b"Transfer-Encoding: chunked\r\n" in received
    assert not received.endswith(b"0\r\n\r\n"), (
        "a body cut by a reset was relayed as complete"
    )
    assert failures == 1
    assert f"endpoint {address} failed mid-response" in caplog.text
    assert "Connection reset by peer" in caplog.text
    await upstream.stop()


async def test_eof_after_close_delimited_body_completes() -> None:
    async def body_then_close(writer: asyncio.StreamWriter) -> bool:
        await in_parts(CLOSE_HEAD + b"hello", b"world")(writer)
        return False

    upstream = scripted(body_then_close)
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        received, ending = await read_until_closed(port, GET_HTTP10)
        address = f"127.0.0.1:{upstream.port}"
        failures = service.health.snapshot()["app"][address]["consecutive_failures"]
    assert received.endswith(b"\r\n\r\nhelloworld"), received
    assert ending == "eof"
    assert failures == 0
    await upstream.stop()
