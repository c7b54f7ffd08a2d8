"""Listener limits through a real pgproxy process: timeouts and size limits.

The listener allows 1s to send the request head, keeps idle connections 1s,
and caps heads at 8 KiB (431 above) and bodies at 64 KiB (413 above).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_client import RawConnection, Response, build_request, chunk, echo_of
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"
header_read_timeout = "1s"
idle_timeout = "1s"
max_header_bytes = "8KiB"
max_body_bytes = "64KiB"

[[routes]]
path_prefix = "/"
cluster = "a"

[clusters.a]
endpoints = ["{a}"]
"""

BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def upstream(module_upstream_factory: UpstreamFactory) -> Upstream:
    return module_upstream_factory("a")


@pytest.fixture(scope="module")
def proxy(module_pgproxy_factory: PgproxyFactory, upstream: Upstream) -> PgproxyProcess:
    return module_pgproxy_factory(CONFIG.format(a=upstream.address))


@pytest.fixture(autouse=True)
def fresh_upstream(upstream: Upstream) -> Iterator[None]:
    upstream.reset()
    yield


def assert_rejected(conn: RawConnection, response: Response, status: int) -> None:
    """Check an error response from pgproxy and that it closed the connection."""
    assert response.status == status, f"expected {status}, got:\n{response.describe()}"
    assert (response.header("content-type") or "").startswith("text/plain"), (
        response.describe()
    )
    assert (response.header("connection") or "").lower() == "close", (
        f"a {status} that ends the connection should say Connection: close"
    )
    assert conn.wait_closed(5) is not None, (
        f"pgproxy kept the connection open after {status}"
    )


def test_slow_request_head_gets_408(proxy: PgproxyProcess, upstream: Upstream) -> None:
    with RawConnection(proxy.port(), timeout=8) as conn:
        conn.send(b"GET /slow-head HTTP/1.1\r\nHost: test.local\r\n")
        response = conn.read_response(timeout=8)
        assert_rejected(conn, response, 408)
    assert upstream.requests == []


def test_idle_keep_alive_closed(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port(), timeout=8) as conn:
        conn.send(build_request("GET", "/before-idle"))
        echo_of(conn.read_response())
        extra = conn.wait_closed(8)
        assert extra is not None, (
            "pgproxy kept an idle connection open past idle_timeout (1s)"
        )
        assert extra == b"", (
            f"pgproxy sent bytes when closing an idle connection: {extra[:200]!r}"
        )


def test_silent_connection_closed(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port(), timeout=8) as conn:
        extra = conn.wait_closed(8)
        assert extra is not None, (
            "pgproxy kept a connection that never sent a byte open"
        )


def test_header_too_large_431(proxy: PgproxyProcess, upstream: Upstream) -> None:
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/big-header", headers=[("X-Big", "v" * 16384)]))
        assert_rejected(conn, conn.read_response(), 431)
    assert upstream.requests == []


def test_many_headers_over_limit_431(proxy: PgproxyProcess, upstream: Upstream) -> None:
    headers = [(f"X-Header-{index}", "v" * 50) for index in range(200)]
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/many-headers", headers=headers))
        assert_rejected(conn, conn.read_response(), 431)
    assert upstream.requests == []


def test_header_under_limit_allowed(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/under", headers=[("X-Big", "v" * 6000)]))
        document = echo_of(conn.read_response())
    assert document["target"] == "/under"


def test_content_length_over_limit_413(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    # Only the head is sent: the decision must come from Content-Length alone,
    # and no unread body can turn pgproxy's close into a reset that eats the 413.
    headers = [("Content-Length", str(BODY_LIMIT + 1))]
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("POST", "/too-big", headers=headers))
        assert_rejected(conn, conn.read_response(), 413)
    assert upstream.requests == [], (
        "the upstream saw a request whose Content-Length is over the limit"
    )


def test_content_length_at_limit_allowed(proxy: PgproxyProcess) -> None:
    body = b"b" * BODY_LIMIT
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("POST", "/at-limit", body=body))
        document = echo_of(conn.read_response())
    assert document["body_length"] == BODY_LIMIT


def test_chunked_over_limit_413(proxy: PgproxyProcess) -> None:
    head = build_request(
        "POST", "/chunked-too-big", headers=[("Transfer-Encoding", "chunked")]
    )
    # 100 bytes over the limit, so pgproxy has read all of it when it responds.
    body = b"".join(chunk(b"c" * 16384) for _ in range(4)) + chunk(b"c" * 100)
    with RawConnection(proxy.port()) as conn:
        conn.send(head + body)
        response = conn.read_response()
        assert_rejected(conn, response, 413)


def test_chunked_at_limit_allowed(proxy: PgproxyProcess) -> None:
    head = build_request(
        "POST", "/chunked-at-limit", headers=[("Transfer-Encoding", "chunked")]
    )
    body = b"".join(chunk(b"c" * 16384) for _ in range(4)) + b"0\r\n\r\n"
    with RawConnection(proxy.port()) as conn:
        conn.send(head + body)
        document = echo_of(conn.read_response())
    assert document["body_length"] == BODY_LIMIT
