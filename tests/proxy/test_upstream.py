"""Protocol tests of upstream connections and pools over loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from pgproxy.proxy.pool import Pools
from pgproxy.proxy.upstream import PEEK_AFTER_IDLE, UpstreamConnection
from tests.proxy.loopback import (
    ScriptedUpstream,
    exchange,
    make_graph,
    read_response,
    running_proxy,
    wait_for_zero,
)

pytestmark = pytest.mark.anyio

GET = b"GET /x HTTP/1.1\r\nHost: test.local\r\n\r\n"
GET_CLOSE = b"GET /x HTTP/1.1\r\nHost: test.local\r\nConnection: close\r\n\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """Yield a loopback port that refuses connections while the block runs.

    The socket stays bound without listening: a connect to it is refused, and
    no other bind can take the port. A port released at once could go to the
    proxy's own listener, which would then proxy to itself until the head
    outgrew the test client's read limit.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


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


async def test_unread_eof_found_by_peek_after_idle() -> None:
    """A FIN the loop has not read yet is found by the peek before reuse."""
    closing = ScriptedUpstream()
    await closing.start()
    async with running_proxy(make_graph([closing.port])) as (port, service):
        first = await exchange(port, GET)
        pool = service.pools.all()[0]
        conn = pool._idle[-1]
        assert conn.transport is not None
        # Keep the loop from reading the FIN, so only the peek can see it.
        conn.transport.pause_reading()
        closing.writers[-1].close()
        await anyio.sleep(PEEK_AFTER_IDLE + 0.2)
        assert not conn.closed
        second = await exchange(port, GET)
        assert conn.closed
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert second.startswith(b"HTTP/1.1 200 OK")
    assert closing.connections == 2
    await closing.stop()


async def test_eof_seen_by_loop_is_never_reused() -> None:
    """Between eof_received and connection_lost the pool must not hand it out."""
    upstream = ScriptedUpstream()
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        await exchange(port, GET)
        pool = service.pools.all()[0]
        conn = pool._idle[-1]
        conn.eof_received()
        assert pool.acquire() is None
        assert conn.closed
        reply = await exchange(port, GET)
    assert reply.startswith(b"HTTP/1.1 200 OK")
    assert upstream.connections == 2
    await upstream.stop()


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
    with refused_port() as dead:
        graph = make_graph([dead, upstream.port])
        async with running_proxy(graph) as (port, _):
            replies = [await exchange(port, GET) for _ in range(4)]
    assert all(reply.startswith(b"HTTP/1.1 200 OK") for reply in replies)
    await upstream.stop()


async def test_connect_failure_without_retry_is_502() -> None:
    with refused_port() as dead:
        async with running_proxy(make_graph([dead])) as (port, _):
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


def close_on_second_request(upstream: ScriptedUpstream) -> None:
    """Answer the first request of each connection; drop the second unanswered.

    This is the keep-alive race: the upstream closes an idle connection just
    as the proxy sends the next request on it, so the close reaches the proxy
    only after the request was written.
    """
    served: dict[int, int] = {}

    async def reply(head: bytes) -> bytes | None:
        key = len(upstream.writers)
        served[key] = served.get(key, 0) + 1
        if served[key] > 1:
            return None
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    upstream.reply = reply


async def test_keepalive_race_repeated_on_fresh_connection() -> None:
    upstream = ScriptedUpstream()
    close_on_second_request(upstream)
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        first = await exchange(port, GET)
        second = await exchange(port, GET)
        pool = service.pools.all()[0]
        opened = pool.opened
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert second.startswith(b"HTTP/1.1 200 OK"), second[:200]
    assert upstream.connections == 2
    assert opened == 2
    await upstream.stop()


async def test_keepalive_race_post_not_repeated() -> None:
    upstream = ScriptedUpstream()
    close_on_second_request(upstream)
    await upstream.start()
    post = b"POST /x HTTP/1.1\r\nHost: test.local\r\nContent-Length: 2\r\n\r\nhi"
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        first = await exchange(port, GET)
        second = await exchange(port, post)
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert second.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert upstream.connections == 1, "a POST the upstream may have read is not re-sent"
    await upstream.stop()


async def test_keepalive_race_post_with_idempotency_key_repeated() -> None:
    upstream = ScriptedUpstream()
    close_on_second_request(upstream)
    await upstream.start()
    post = (
        b"POST /x HTTP/1.1\r\nHost: test.local\r\nIdempotency-Key: k1\r\n"
        b"Content-Length: 2\r\n\r\nhi"
    )
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        await exchange(port, GET)
        second = await exchange(port, post)
    assert second.startswith(b"HTTP/1.1 200 OK"), second[:200]
    assert upstream.connections == 2
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
    graph = make_graph([1])
    pools = Pools()
    endpoint = graph.clusters["app"].endpoints[0]
    pool = pools.get(endpoint, 4.0, 8)
    assert pool.acquire() is None
    assert "idle=0 active=0" in repr(pool)
    assert "endpoints=1" in repr(pools)


async def test_extra_response_not_given_to_pipelined_request() -> None:
    upstream = ScriptedUpstream()

    async def reply_by_path(head: bytes) -> bytes | None:
        if head.startswith(b"GET /first "):
            # One response too many: the second one belongs to no request.
            return (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
            )
        return b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"

    upstream.reply = reply_by_path
    await upstream.start()
    pipelined = (
        b"GET /first HTTP/1.1\r\nHost: test.local\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: test.local\r\n\r\n"
    )
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(pipelined)
        with anyio.fail_after(5):
            first = await read_response(reader)
            second = await read_response(reader)
        writer.close()
    assert first.endswith(b"\r\n\r\nfirst")
    assert second.endswith(b"\r\n\r\nsecond"), (
        "the bytes after the first response were taken as the second one"
    )
    assert upstream.connections == 2
    await upstream.stop()


async def test_head_response_with_body_not_pooled() -> None:
    upstream = ScriptedUpstream()

    async def body_even_for_head(head: bytes) -> bytes | None:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"

    upstream.reply = body_even_for_head
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        head_reply = await exchange(
            port,
            b"HEAD /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            until_close=True,
        )
        await exchange(port, GET)
        pool = service.pools.all()[0]
        assert pool.opened == 2
    assert head_reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head_reply.endswith(b"\r\n\r\n"), "a HEAD response carried a body"
    assert upstream.connections == 2
    await upstream.stop()


async def test_no_content_with_stray_bytes_not_pooled() -> None:
    upstream = ScriptedUpstream()

    async def no_content_then_bytes(head: bytes) -> bytes | None:
        return b"HTTP/1.1 204 No Content\r\n\r\nstray"

    upstream.reply = no_content_then_bytes
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        first = await exchange(port, GET)
        second = await exchange(port, GET)
        assert service.pools.all()[0].idle == 0
    assert first.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert second.startswith(b"HTTP/1.1 204 No Content\r\n")
    assert upstream.connections == 2
    await upstream.stop()


def _response_with_header(value_size: int) -> bytes:
    filler = b"v" * value_size
    return (
        b"HTTP/1.1 200 OK\r\nX-Filler: " + filler + b"\r\nContent-Length: 2\r\n\r\nok"
    )


@pytest.mark.parametrize(
    ("value_size", "status"),
    [(1000, b"200"), (3000, b"502"), (4 * 1024 * 1024, b"502")],
    ids=["under", "over", "one-huge-field"],
)
async def test_response_head_limit(value_size: int, status: bytes) -> None:
    upstream = ScriptedUpstream()

    async def reply(head: bytes) -> bytes | None:
        return _response_with_header(value_size)

    upstream.reply = reply
    await upstream.start()
    graph = make_graph([upstream.port], max_response_header_bytes="2KiB")
    async with running_proxy(graph) as (port, service):
        answer = await exchange(port, GET)
        idle = service.pools.all()[0].idle
    assert answer.startswith(b"HTTP/1.1 " + status + b" ")
    if status == b"502":
        assert b"response_header_too_large" in answer
        assert idle == 0
    await upstream.stop()


HEAD_LIMIT = 1024
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"


def _head_of_size(size: int, framing_field: bytes) -> bytes:
    """Return a 200 head of exactly `size` bytes, CRLF CRLF included."""
    start = b"HTTP/1.1 200 OK\r\nX-Filler:   "
    end = b"\r\n" + framing_field + b"\r\n\r\n"
    return start + b"v" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("extra", [0, 1], ids=["at-limit", "one-over"])
@pytest.mark.parametrize(
    ("before", "framing_field", "body", "split"),
    [
        (b"", b"Content-Length: 2", b"ok", 0),
        (b"", b"Transfer-Encoding: chunked", b"2\r\nok\r\n0\r\n\r\n", 0),
        (EARLY_HINTS, b"Content-Length: 2", b"ok", 0),
        (b"\r\n", b"Content-Length: 2", b"ok", 0),
        (b"", b"Content-Length: 2", b"ok", 100),
        (EARLY_HINTS, b"Content-Length: 2", b"ok", 100),
        (b"", b"Content-Length: 2", b"ok", -1),
        (b"", b"Content-Length: 2", b"ok", -2),
        (b"", b"Content-Length: 2", b"ok", -3),
    ],
    ids=[
        "length",
        "chunked",
        "after-interim",
        "after-crlf",
        "split-in-field",
        "interim-then-split",
        "split-before-last-lf",
        "split-before-last-crlf",
        "split-before-last-lf-crlf",
    ],
)
async def test_response_head_limit_is_exact(
    before: bytes, framing_field: bytes, body: bytes, split: int, extra: int
) -> None:
    """The limit counts the head from its status line through CRLF CRLF.

    `split` is where the upstream stops writing for a moment, so that the
    head usually arrives in two reads (the result must not depend on it).
    """
    upstream = ScriptedUpstream()
    head = _head_of_size(HEAD_LIMIT + extra, framing_field)

    async def reply(request_head: bytes) -> bytes | None:
        data = before + head + body
        if not split:
            return data
        at = len(before) + (split if split > 0 else len(head) + split)
        writer = upstream.writers[-1]
        writer.write(data[:at])
        await writer.drain()
        await asyncio.sleep(0.02)
        return data[at:]

    upstream.reply = reply
    await upstream.start()
    graph = make_graph([upstream.port], max_response_header_bytes="1KiB")
    async with running_proxy(graph) as (port, _):
        answer = await exchange(port, GET_CLOSE, until_close=True)
    await upstream.stop()
    final = answer.removeprefix(EARLY_HINTS)
    if extra:
        assert final.startswith(b"HTTP/1.1 502 "), final[:100]
        assert b"response_header_too_large" in final
    else:
        assert final.startswith(b"HTTP/1.1 200 OK\r\n"), final[:100]
        assert final.endswith(body)


async def test_head_limit_ignores_same_read_body() -> None:
    upstream = ScriptedUpstream()
    body = b"b" * 3000

    async def reply(head: bytes) -> bytes | None:
        filler = b"v" * 1000
        return (
            b"HTTP/1.1 200 OK\r\nX-Filler: " + filler + b"\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )

    upstream.reply = reply
    await upstream.start()
    graph = make_graph([upstream.port], max_response_header_bytes="2KiB")
    async with running_proxy(graph) as (port, _):
        answer = await exchange(port, GET)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(body)
    await upstream.stop()


async def test_head_reaches_client_before_the_body_is_sent() -> None:
    """A head read without llhttp is written at once, not held for the body."""
    upstream = ScriptedUpstream()
    head_seen = asyncio.Event()

    async def head_then_body(head: bytes) -> bytes | None:
        writer = upstream.writers[-1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        await writer.drain()
        await head_seen.wait()
        return b"body"

    upstream.reply = head_then_body
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GET)
        with anyio.fail_after(5):
            head = await reader.readuntil(b"\r\n\r\n")
            head_seen.set()
            body = await reader.readexactly(4)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"body"
    await upstream.stop()


async def test_body_over_several_reads_is_counted_exactly() -> None:
    """Each part is sent only once the client has the one before it."""
    upstream = ScriptedUpstream()
    parts = [b"a" * 70000, b"b" * 3, b"c" * 5000]
    length = sum(len(part) for part in parts)
    relayed: asyncio.Queue[None] = asyncio.Queue()

    async def in_parts(head: bytes) -> bytes | None:
        writer = upstream.writers[-1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
        for part in parts[:-1]:
            writer.write(part)
            await writer.drain()
            await relayed.get()
        return parts[-1]

    upstream.reply = in_parts
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):  # the second response comes on the pooled connection
            writer.write(GET)
            with anyio.fail_after(5):
                await reader.readuntil(b"\r\n\r\n")
                for i, part in enumerate(parts):
                    assert await reader.readexactly(len(part)) == part
                    if i < len(parts) - 1:
                        relayed.put_nowait(None)
        writer.close()
        assert service.pools.all()[0].opened == 1
    assert upstream.connections == 1
    await upstream.stop()


async def test_close_mid_body_ends_client() -> None:
    upstream = ScriptedUpstream()

    async def short_body(head: bytes) -> bytes | None:
        writer = upstream.writers[-1]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        return None  # close the connection 7 bytes short

    upstream.reply = short_body
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reply = await exchange(port, GET, until_close=True)
        assert service.pools.all()[0].idle == 0
    # The head and the body bytes received are relayed. Then the client's
    # connection closes short of Content-Length, as the upstream's did.
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert reply.endswith(b"\r\n\r\nabc")
    await upstream.stop()


async def test_missing_tls_ca_file_is_502(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = ScriptedUpstream()
    await upstream.start()
    missing = tmp_path / "missing-ca.pem"
    graph = make_graph(
        [],
        endpoints=[f"https://127.0.0.1:{upstream.port}"],
        tls_ca_file=str(missing),
    )
    async with running_proxy(graph) as (port, _):
        reply = await exchange(port, GET)
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"connect_failure" in reply
    assert f'cannot load tls_ca_file "{missing}"' in caplog.text
    assert upstream.heads == []
    await upstream.stop()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n\r\n\n",
        b"HTTP/1.1 204 No Content\r\n\r\n\r\n",
    ],
    ids=["crlf", "cr-lf-run", "no-content"],
)
async def test_crlf_after_response_keeps_connection(
    reply: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """CR and LF after a response are skipped, as llhttp skips them."""
    upstream = ScriptedUpstream()

    async def with_crlf(head: bytes) -> bytes | None:
        return reply

    upstream.reply = with_crlf
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        for _ in range(3):
            answer = await exchange(port, GET)
            assert answer.startswith(reply[:12])
        assert service.pools.all()[0].opened == 1
    assert upstream.connections == 1
    assert "sent bytes after a complete response" not in caplog.text
    await upstream.stop()


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"Content-Length: 2\r\n\r\nok",
    ],
    ids=["chunked", "length"],
)
async def test_proxy_connection_close_not_pooled(framing: bytes) -> None:
    """llhttp reads Proxy-Connection as Connection and refuses any later response.

    So the connection must not go back to the pool, whichever parser read
    the head: a chunked response after it would get 502 otherwise.
    """
    upstream = ScriptedUpstream()

    async def reply_by_path(head: bytes) -> bytes | None:
        if head.startswith(b"GET /first "):
            return b"HTTP/1.1 200 OK\r\nProxy-Connection: close\r\n" + framing
        return (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )

    upstream.reply = reply_by_path
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, _):
        first = await exchange(
            port,
            b"GET /first HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            until_close=True,
        )
        second = await exchange(
            port,
            b"GET /second HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            until_close=True,
        )
    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Proxy-Connection" not in first
    assert second.startswith(b"HTTP/1.1 200 OK\r\n"), second
    assert upstream.connections == 2
    await upstream.stop()


CLOSE_103 = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nConnection: close\r\n\r\n"
CLOSE_100 = b"HTTP/1.1 100 Continue\r\nConnection: close\r\n\r\n"
CHUNKED_OK = b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
LENGTH_OK = b"Content-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    ("interim", "framing", "relayed_body"),
    [
        (CLOSE_103, LENGTH_OK, b"\r\n\r\nok"),
        (CLOSE_103, CHUNKED_OK, b"\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        (CLOSE_100, LENGTH_OK, b"\r\n\r\nok"),
    ],
    ids=["103-length", "103-chunked", "100-length"],
)
async def test_interim_close_same_read(
    interim: bytes, framing: bytes, relayed_body: bytes
) -> None:
    """The final response after a 1xx with Connection: close is relayed.

    The close applies to the connection, so it is not pooled afterwards.
    """
    upstream = ScriptedUpstream()

    async def reply(head: bytes) -> bytes | None:
        return interim + b"HTTP/1.1 200 OK\r\n" + framing

    upstream.reply = reply
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        first = await exchange(port, GET_CLOSE, until_close=True)
        idle = service.pools.all()[0].idle
        second = await exchange(port, GET_CLOSE, until_close=True)
    if interim == CLOSE_103:
        # 103 is forwarded without its hop-by-hop Connection field.
        assert first.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
    else:
        # The proxy sends its own 100 Continue, so an upstream 100 is dropped.
        assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"HTTP/1.1 200 OK\r\n" in first, first
    assert first.endswith(relayed_body)
    assert b"HTTP/1.1 200 OK\r\n" in second, second
    assert idle == 0
    assert upstream.connections == 2
    await upstream.stop()


async def test_interim_close_separate_reads() -> None:
    upstream = ScriptedUpstream()
    interim_seen = asyncio.Event()

    async def interim_then_final(head: bytes) -> bytes | None:
        writer = upstream.writers[-1]
        writer.write(CLOSE_103)
        await writer.drain()
        await interim_seen.wait()
        return b"HTTP/1.1 200 OK\r\n" + CHUNKED_OK

    upstream.reply = interim_then_final
    await upstream.start()
    async with running_proxy(make_graph([upstream.port])) as (port, service):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GET_CLOSE)
        with anyio.fail_after(5):
            interim = await reader.readuntil(b"\r\n\r\n")
            interim_seen.set()
            final = await reader.read(-1)
        writer.close()
        idle = service.pools.all()[0].idle
    assert interim.startswith(b"HTTP/1.1 103 Early Hints\r\n")
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert final.endswith(b"2\r\nok\r\n0\r\n\r\n")
    assert idle == 0
    await upstream.stop()


async def test_closed_upstream_connections_freed_without_gc() -> None:
    # The parser and the transport contain references to the connection. A
    # connection that kept them after connection_lost would stay alive in
    # reference cycles, which only the cyclic GC frees, and the GC is off here.
    async def close_after(head: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    def live() -> int:
        return sum(isinstance(obj, UpstreamConnection) for obj in gc.get_objects())

    upstream = ScriptedUpstream(reply=close_after)
    await upstream.start()
    gc.collect()
    gc.disable()
    try:
        async with running_proxy(make_graph([upstream.port])) as (port, _):
            for _ in range(3):
                assert (await exchange(port, GET)).startswith(b"HTTP/1.1 200")
            assert await wait_for_zero(live) == 0
    finally:
        gc.enable()
        await upstream.stop()
