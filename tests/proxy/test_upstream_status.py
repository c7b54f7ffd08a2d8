"""Upstream status codes outside 100-599, over loopback sockets.

RFC 9110 section 15 defines status codes 100-599, and a client that
receives another three-digit code should treat it as a 5xx. llhttp accepts
any three digits, so pgproxy itself rejects such a response as invalid: the
client gets 502 `bad_response`, the endpoint gets a failure, and the
connection is closed instead of pooled.
"""

from __future__ import annotations

import logging

import pytest

from tests.proxy.loopback import ScriptedUpstream, exchange, make_graph, running_proxy

pytestmark = pytest.mark.anyio

GET = b"GET /x HTTP/1.1\r\nHost: test.local\r\n\r\n"
HEAD_CLOSE = b"HEAD /x HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n"

OUT_OF_RANGE = {
    "600": b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\nok",
    "999": b"HTTP/1.1 999 X\r\nContent-Length: 2\r\n\r\nok",
    "600-chunked": b"HTTP/1.1 600 X\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    "600-no-length": b"HTTP/1.1 600 X\r\nConnection: close\r\n\r\nok",
    "600-http10": b"HTTP/1.0 600 X\r\nContent-Length: 2\r\n\r\nok",
    "600-after-continue": b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def replying(answer: bytes) -> ScriptedUpstream:
    """Return an upstream that sends `answer` to every request."""

    async def reply(head: bytes) -> bytes | None:
        return answer

    return ScriptedUpstream(reply=reply)


@pytest.mark.parametrize("answer", OUT_OF_RANGE.values(), ids=OUT_OF_RANGE.keys())
async def test_status_outside_range_is_502(
    answer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    upstream = replying(answer)
    await upstream.start()
    graph = make_graph([upstream.port])
    async with running_proxy(graph) as (port, service):
        first = await exchange(port, GET)
        second = await exchange(port, GET)
        pool = service.pools.all()[0]
        idle, active, opened = pool.idle, pool.active, pool.opened
        endpoint = graph.clusters["app"].endpoints[0]
        health = service.health.snapshot()["app"][endpoint.address]
    assert idle == 0, "a connection that sent an invalid status was pooled"
    assert active == 0
    assert opened == 2
    for reply in (first, second):
        assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), reply
        assert b"bad_response" in reply
        assert b"\r\n\r\nok" not in reply
    assert health["consecutive_failures"] == 2
    assert f"request to endpoint {endpoint.address} failed" in caplog.text
    assert "invalid response: status code" in caplog.text
    assert upstream.connections == 2
    await upstream.stop()


async def test_status_outside_range_to_head_is_502() -> None:
    upstream = replying(b"HTTP/1.1 600 X\r\nContent-Length: 2\r\n\r\n")
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reply = await exchange(port, HEAD_CLOSE, until_close=True)
        idle = service.pools.all()[0].idle
    assert idle == 0
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), reply
    await upstream.stop()


async def test_status_599_is_relayed_and_pooled() -> None:
    upstream = replying(
        b"HTTP/1.1 599 X\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    await upstream.start()
    graph = make_graph([upstream.port])
    async with running_proxy(graph) as (port, service):
        first = await exchange(port, GET)
        second = await exchange(port, GET)
        pool = service.pools.all()[0]
        idle, opened = pool.idle, pool.opened
        endpoint = graph.clusters["app"].endpoints[0]
        health = service.health.snapshot()["app"][endpoint.address]
    assert idle == 1
    assert opened == 1
    for reply in (first, second):
        assert reply.startswith(b"HTTP/1.1 599 X\r\n"), reply
    assert health["consecutive_failures"] == 0
    assert upstream.connections == 1
    await upstream.stop()


async def test_status_outside_range_ejects_endpoint() -> None:
    bad = replying(OUT_OF_RANGE["600"])
    good = ScriptedUpstream()
    await bad.start()
    await good.start()
    graph = make_graph(
        [bad.port, good.port],
        outlier_detection={"consecutive_failures": 2, "base_ejection_time": "60s"},
    )
    bad_address = f"127.0.0.1:{bad.port}"
    async with running_proxy(graph) as (port, service):
        # Round robin alternates, so four requests give the bad endpoint two.
        replies = [await exchange(port, GET) for _ in range(4)]
        health = service.health.snapshot()["app"][bad_address]
        after = [await exchange(port, GET) for _ in range(4)]
    assert sum(reply.startswith(b"HTTP/1.1 502 ") for reply in replies) == 2
    assert health["status"] == "ejected"
    assert "bad_response" in str(health["reason"])
    assert all(reply.startswith(b"HTTP/1.1 200 OK\r\n") for reply in after), after
    assert len(bad.heads) == 2
    await bad.stop()
    await good.stop()
