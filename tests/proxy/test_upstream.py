"""Protocol tests of upstream connections and pools over loopback sockets."""

from __future__ import annotations

import asyncio
import socket

import anyio
import pytest

from pgproxy.proxy.upstream import Pools
from tests.proxy.loopback import ScriptedUpstream, exchange, make_graph, running_proxy

pytestmark = pytest.mark.anyio

GET = b"GET /x HTTP/1.1\r\nHost: test.local\r\n\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    """Return a loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_reused_across_requests() -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        for _ in range(5):
            reply = await exchange(port, GET)
            assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert upstream.connections == 1
        pool = service.pools.all()[0]
        assert pool.idle == 1
        assert pool.opened == 1
    await upstream.stop()


async def test_stale_pooled_connection_replaced() -> None:
    closing = ScriptedUpstream()

    async def reply_then_close(head: bytes) -> bytes | None:
        # Answer, then close the connection without announcing it.
        asyncio.get_running_loop().call_soon(closing.writers[-1].close)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    closing.reply = reply_then_close
    await closing.start()
    async with running_proxy(make_graph([closing.port])) as (port, _):
        first = await exchange(port, GET)
        await anyio.sleep(0.2)  # the upstream's FIN arrives while the pool holds it
        second = await exchange(port, GET)
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert second.startswith(b"HTTP/1.1 200 OK")
    assert closing.connections == 2
    await closing.stop()


async def test_idle_connection_expires() -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    graph = make_graph([upstream.port], pool_idle_timeout="100ms")
    async with running_proxy(graph) as (port, service):
        await exchange(port, GET)
        pool = service.pools.all()[0]
        with anyio.fail_after(5):
            # The pool has no event for expiry, so poll its count.
            while pool.idle:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await exchange(port, GET)
    assert upstream.connections == 2
    await upstream.stop()


async def test_max_idle_connections_zero_closes_after_use() -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    graph = make_graph([upstream.port], max_idle_connections=0)
    async with running_proxy(graph) as (port, service):
        await exchange(port, GET)
        await exchange(port, GET)
        assert service.pools.all()[0].idle == 0
    assert upstream.connections == 2
    await upstream.stop()


async def test_connect_failure_retried_on_other_endpoint() -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    graph = make_graph([free_port(), upstream.port])
    async with running_proxy(graph) as (port, _):
        replies = [await exchange(port, GET) for _ in range(4)]
    assert all(reply.startswith(b"HTTP/1.1 200 OK") for reply in replies)
    await upstream.stop()


async def test_connect_failure_without_retry_is_502() -> None:
    graph = make_graph([free_port()])
    async with running_proxy(graph) as (port, _):
        reply = await exchange(port, GET)
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"connect_failure" in reply


async def test_upstream_reset_before_response_is_502() -> None:
    upstream = ScriptedUpstream()

    async def hang_up(head: bytes) -> bytes | None:
        return None

    upstream.reply = hang_up
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reply = await exchange(port, GET)
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert upstream.connections == 1, (
        "a request that reached the upstream is not retried"
    )
    await upstream.stop()


async def test_invalid_response_is_502() -> None:
    upstream = ScriptedUpstream()

    async def garbage(head: bytes) -> bytes | None:
        return b"HELLO\r\n\r\n"

    upstream.reply = garbage
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reply = await exchange(port, GET)
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"bad_response" in reply
    await upstream.stop()


async def test_pool_repr_counts() -> None:
    graph = make_graph([free_port()])
    pools = Pools()
    endpoint = graph.clusters["app"].endpoints[0]
    pool = pools.get(endpoint, 4.0, 8)
    assert pool.acquire() is None
    assert "idle=0 active=0" in repr(pool)
    assert "endpoints=1" in repr(pools)
