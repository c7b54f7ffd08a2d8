"""HTTP/1.1 framing through a real pgproxy process (RFC 9112, RFC 9110).

Covers keep-alive and pipelining, and Content-Length and chunked bodies in
both directions. Streaming tests check that a body is forwarded before it has
fully arrived. Also covered: responses without bodies (HEAD, 1xx, 204, 304),
Expect: 100-continue, HTTP/1.0 clients, Connection: close on either side, and
an upstream that dies in the middle of a response.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from e2e_client import RawConnection, build_request, chunk, echo_of, request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import (
    ReceivedRequest,
    Upstream,
    UpstreamConnection,
    UpstreamFactory,
    by_path,
    chunked,
    delayed,
    echo,
    fixed,
    raw,
    response_bytes,
    truncated_chunked,
    truncated_length,
)

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"
max_body_bytes = "64KiB"

[[routes]]
path_prefix = "/"
cluster = "a"

[clusters.a]
endpoints = ["{a}"]
response_header_timeout = "5s"

[clusters.a.outlier_detection]
enabled = false
"""


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


def test_keep_alive_serves_many_requests(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port()) as conn:
        for index in range(5):
            conn.send(build_request("GET", f"/keep/{index}"))
            response = conn.read_response()
            assert echo_of(response)["target"] == f"/keep/{index}"
            assert response.header("connection") != "close", response.describe()
        assert conn.is_open_after(0.2), (
            "pgproxy closed a keep-alive connection after 5 requests"
        )


def test_pipelined_requests_answered_in_order(proxy: PgproxyProcess) -> None:
    data = (
        build_request("GET", "/pipe/1")
        + build_request("POST", "/pipe/2", body=b"second body")
        + build_request("GET", "/pipe/3")
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(data)
        documents = [echo_of(conn.read_response()) for _ in range(3)]
    assert [d["target"] for d in documents] == ["/pipe/1", "/pipe/2", "/pipe/3"]
    assert documents[1]["body"] == "second body"


def test_pipelined_slow_first_stays_in_order(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    upstream.handler = by_path({"/slow": delayed(0.5, echo)})
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/slow") + build_request("GET", "/fast"))
        first = echo_of(conn.read_response())
        second = echo_of(conn.read_response())
    assert first["target"] == "/slow"
    assert second["target"] == "/fast"


def test_content_length_request_body(proxy: PgproxyProcess) -> None:
    body = b"0123456789" * 100
    document = echo_of(request(proxy.port(), "POST", "/cl", body=body))
    assert document["body"] == body.decode()


def test_chunked_request_body(proxy: PgproxyProcess) -> None:
    head = build_request(
        "POST", "/chunked-in", headers=[("Transfer-Encoding", "chunked")]
    )
    body = (
        chunk(b"hello ") + b"6;ext=1\r\nworld!\r\n" + chunk(b"x" * 3000) + b"0\r\n\r\n"
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(head + body)
        document = echo_of(conn.read_response())
    assert document["body_length"] == 12 + 3000
    assert document["body"] == "hello world!" + "x" * 3000
    assert document["method"] == "POST"


def test_empty_chunked_request_body(proxy: PgproxyProcess) -> None:
    head = build_request(
        "POST", "/chunked-empty", headers=[("Transfer-Encoding", "chunked")]
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(head + b"0\r\n\r\n")
        document = echo_of(conn.read_response())
    assert document["body_length"] == 0


def test_chunked_response_forwarded(proxy: PgproxyProcess, upstream: Upstream) -> None:
    pieces = [b"first-", b"second-", b"x" * 10000, b"-last"]
    upstream.handler = chunked(pieces)
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/chunked-out"))
        response = conn.read_response()
        assert response.status == 200, response.describe()
        assert response.body == b"".join(pieces)
        conn.send(build_request("GET", "/after-chunked"))
        upstream.handler = echo
        assert echo_of(conn.read_response())["target"] == "/after-chunked"


def test_chunked_response_is_streamed(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    """The first chunk reaches the client while the upstream holds back the rest."""
    gate = threading.Event()
    upstream.handler = chunked([b"early-chunk", b"late-chunk"], gate=gate)
    try:
        with RawConnection(proxy.port()) as conn:
            conn.send(build_request("GET", "/stream-out"))
            head = conn.read_head()
            assert head.status == 200, head.describe()
            assert conn.wait_for_bytes(b"early-chunk", 5), (
                "the first chunk did not arrive within 5s while the upstream held back "
                "the rest: pgproxy buffers chunked responses"
            )
            gate.set()
            response_rest = conn.wait_for_bytes(b"0\r\n\r\n", 5)
            assert response_rest, (
                "the response did not finish after the upstream sent the rest"
            )
    finally:
        gate.set()


def test_request_body_is_streamed(proxy: PgproxyProcess, upstream: Upstream) -> None:
    """The upstream gets the first part of a body before the client sends the rest."""
    first_part_seen = threading.Event()

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        received = bytearray()
        for data in conn.iter_body(request):
            received += data
            if b"part-one" in received:
                first_part_seen.set()
        request.body = bytes(received)
        request.body_length = len(received)
        return echo(request, conn)

    handle.stream_body = True  # type: ignore[attr-defined]
    upstream.handler = handle
    head = build_request(
        "POST", "/stream-in", headers=[("Transfer-Encoding", "chunked")]
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(head + chunk(b"part-one"))
        assert first_part_seen.wait(5), (
            "the upstream did not receive the first chunk within 5s: pgproxy buffers "
            "request bodies"
        )
        conn.send(chunk(b"part-two") + b"0\r\n\r\n")
        document = echo_of(conn.read_response())
    assert document["body"] == "part-onepart-two"


def test_close_delimited_response(proxy: PgproxyProcess, upstream: Upstream) -> None:
    body = b"no length, ends at close " * 100
    upstream.handler = raw(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body, close=True
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/close-delimited"))
        response = conn.read_response()
    assert response.status == 200, response.describe()
    assert response.body == body


def test_head_response_has_no_body(proxy: PgproxyProcess, upstream: Upstream) -> None:
    upstream.handler = by_path(
        {"/head": raw(response_bytes(200, headers=[("Content-Length", "5000")]))}
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("HEAD", "/head"))
        response = conn.read_response("HEAD")
        assert response.status == 200, response.describe()
        assert response.header("content-length") == "5000", (
            "HEAD should keep the GET's Content-Length"
        )
        conn.send(build_request("GET", "/after-head"))
        after = conn.read_response()
        assert echo_of(after)["target"] == "/after-head", (
            "the connection is out of sync after HEAD: pgproxy sent or awaited a body"
        )


def test_head_with_chunked_header(proxy: PgproxyProcess, upstream: Upstream) -> None:
    upstream.handler = by_path(
        {"/head": raw(response_bytes(200, headers=[("Transfer-Encoding", "chunked")]))}
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("HEAD", "/head-chunked"))
        response = conn.read_response("HEAD")
        assert response.status == 200
        conn.send(build_request("GET", "/after-head"))
        assert echo_of(conn.read_response())["target"] == "/after-head"


@pytest.mark.parametrize(
    ("status", "extra"),
    [(204, []), (304, [("ETag", '"v1"'), ("Content-Length", "1234")])],
    ids=["204", "304-with-content-length"],
)
def test_bodyless_status(
    proxy: PgproxyProcess, upstream: Upstream, status: int, extra: list[tuple[str, str]]
) -> None:
    head = response_bytes(status, headers=extra, content_length=False)
    upstream.handler = by_path({"/bodyless": raw(head)})
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/bodyless"))
        response = conn.read_response()
        assert response.status == status, response.describe()
        assert response.header("transfer-encoding") is None, (
            f"a {status} must not be chunked"
        )
        conn.send(build_request("GET", "/after"))
        assert echo_of(conn.read_response())["target"] == "/after", (
            f"the connection is out of sync after a {status}: pgproxy sent or awaited "
            "a body"
        )


def test_no_content_drops_content_length(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    """RFC 9110 section 8.6: no Content-Length in a 204, whatever the upstream sent.

    A client that reads the length as a body would take the next response's
    first bytes for it.
    """
    head = response_bytes(204, headers=[("Content-Length", "5")], content_length=False)
    upstream.handler = by_path({"/no-content-length": raw(head)})
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/no-content-length"))
        response = conn.read_response()
        assert response.status == 204, response.describe()
        assert response.header("content-length") is None, response.describe()
        conn.send(build_request("GET", "/after-no-content"))
        assert echo_of(conn.read_response())["target"] == "/after-no-content"


def test_interim_response_forwarded(proxy: PgproxyProcess, upstream: Upstream) -> None:
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
    final = response_bytes(200, b"final body", [("Content-Type", "text/plain")])
    upstream.handler = raw(early_hints + final)
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/early-hints"))
        response = conn.read_response()
    assert response.status == 200, response.describe()
    assert response.body == b"final body"
    assert [r.status for r in response.interim] == [103], (
        "a proxy forwards 1xx to HTTP/1.1 clients"
    )
    assert response.interim[0].header("link") == "</style.css>; rel=preload"


def test_interim_drops_length_and_hop_fields(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    """A forwarded 1xx carries no Content-Length (RFC 9110 section 8.6) and no
    field that its Connection header names (RFC 9110 section 7.6.1)."""
    early_hints = (
        b"HTTP/1.1 103 Early Hints\r\nConnection: x-hop\r\nX-Hop: 1\r\n"
        b"Content-Length: 5\r\nLink: </a.css>; rel=preload\r\n\r\n"
    )
    upstream.handler = raw(early_hints + response_bytes(200, b"final"))
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/hints-with-framing"))
        response = conn.read_response()
    assert response.status == 200, response.describe()
    assert [r.status for r in response.interim] == [103]
    interim = response.interim[0]
    assert interim.header("content-length") is None, interim.describe()
    assert interim.header("x-hop") is None, interim.describe()
    assert interim.header("connection") is None, interim.describe()
    assert interim.header("link") == "</a.css>; rel=preload"


def test_expect_100_continue(proxy: PgproxyProcess) -> None:
    body = b"sent after 100 Continue"
    head = build_request(
        "POST",
        "/expect",
        headers=[("Expect", "100-continue"), ("Content-Length", str(len(body)))],
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(head)
        interim = conn.read_head()
        assert interim.status == 100, (
            f"expected 100 Continue before the body:\n{interim.describe()}"
        )
        conn.send(body)
        document = echo_of(conn.read_response())
    assert document["body"] == body.decode()


def test_expect_100_continue_too_large(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    head = build_request(
        "POST",
        "/expect-big",
        headers=[("Expect", "100-continue"), ("Content-Length", "1000000")],
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(head)
        response = conn.read_response()
    assert response.status == 413, response.describe()
    assert response.interim == [], "pgproxy sent 100 Continue for a body it rejects"
    assert upstream.requests == []


def test_http10_client(proxy: PgproxyProcess, upstream: Upstream) -> None:
    upstream.handler = chunked([b"one-", b"two"])
    with RawConnection(proxy.port()) as conn:
        conn.send(b"GET /old HTTP/1.0\r\n\r\n")
        response = conn.read_response()
        assert response.status == 200, response.describe()
        assert response.header("transfer-encoding") is None, (
            "chunked must not be sent to HTTP/1.0"
        )
        assert response.body == b"one-two"
        assert conn.wait_closed(5) is not None, (
            "pgproxy kept an HTTP/1.0 connection open"
        )


def test_http10_keep_alive(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port()) as conn:
        conn.send(b"GET /old-ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        response = conn.read_response()
        assert echo_of(response)["target"] == "/old-ka"
        assert response.header("transfer-encoding") is None
        keeps_alive = "keep-alive" in (response.header("connection") or "").lower()
        if keeps_alive:
            conn.send(b"GET /old-ka-2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert echo_of(conn.read_response())["target"] == "/old-ka-2"
        else:
            assert conn.wait_closed(5) is not None, (
                "pgproxy neither confirmed keep-alive nor closed the HTTP/1.0 "
                "connection"
            )


def test_client_connection_close(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/bye", headers=[("Connection", "close")]))
        response = conn.read_response()
        assert echo_of(response)["target"] == "/bye"
        assert (response.header("connection") or "").lower() == "close", (
            response.describe()
        )
        assert conn.wait_closed(5) is not None, (
            "pgproxy did not close after Connection: close"
        )


def test_upstream_connection_close(proxy: PgproxyProcess, upstream: Upstream) -> None:
    upstream.handler = by_path({"/closing": fixed(200, b"closing", close=True)})
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/closing"))
        response = conn.read_response()
        assert response.body == b"closing"
        assert response.header("connection") != "close", (
            "the upstream's Connection: close is hop-by-hop; the client connection "
            "stays open"
        )
        before = upstream.connections_accepted
        conn.send(build_request("GET", "/after-close"))
        assert echo_of(conn.read_response())["target"] == "/after-close"
    assert upstream.connections_accepted == before + 1, (
        "pgproxy should open a new upstream connection after the upstream closed one"
    )


def test_upstream_dies_mid_body(proxy: PgproxyProcess, upstream: Upstream) -> None:
    upstream.handler = truncated_length(100000, 30000)
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/dies"))
        response = conn.read_response(allow_incomplete=True)
        assert response.status == 200, response.describe()
        assert not response.complete, (
            f"the upstream sent 30000 of 100000 bytes, yet the client got a complete "
            f"response of {len(response.body)} bytes"
        )
        assert conn.wait_closed(5) is not None, (
            "pgproxy left a truncated response's connection open"
        )


def test_upstream_dies_mid_chunked(proxy: PgproxyProcess, upstream: Upstream) -> None:
    upstream.handler = truncated_chunked([b"a" * 1000, b"b" * 1000])
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/dies-chunked"))
        response = conn.read_response(allow_incomplete=True)
        assert response.status == 200, response.describe()
        assert not response.complete, (
            "the client got a terminated response from an upstream that died"
        )
        assert conn.wait_closed(5) is not None, (
            "pgproxy left a truncated response's connection open"
        )


def test_truncated_response_logged(proxy: PgproxyProcess, upstream: Upstream) -> None:
    upstream.handler = truncated_length(5000, 100)
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/dies-logged"))
        conn.read_response(allow_incomplete=True)
    record = proxy.access_for_path("/dies-logged")
    assert record["failure"] is not None, (
        f"a truncated response should carry a failure flag: {json.dumps(record)}"
    )


def test_interim_not_sent_to_http10(proxy: PgproxyProcess, upstream: Upstream) -> None:
    """HTTP/1.0 has no 1xx, so none may reach a 1.0 client (RFC 9110 15.2)."""
    early_hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    upstream.handler = raw(early_hints + response_bytes(200, b"final"))
    with RawConnection(proxy.port()) as conn:
        conn.send(b"GET /old-hints HTTP/1.0\r\n\r\n")
        response = conn.read_response()
    assert response.status == 200, response.describe()
    assert response.interim == [], "pgproxy sent a 1xx response to an HTTP/1.0 client"
    assert response.body == b"final"


def test_upstream_cl_and_te_not_both_forwarded(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    """A response with both framings is handled as chunked or rejected.

    RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length, and an
    intermediary that forwards such a message must remove Content-Length.
    """
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    upstream.handler = raw(head + b"5\r\nhello\r\n0\r\n\r\n", close=True)
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/both-framings"))
        response = conn.read_response()
    assert response.status in (200, 502), response.describe()
    if response.status == 200:
        assert response.body == b"hello", (
            "Transfer-Encoding must override Content-Length"
        )
        has_both = "content-length" in response.header_names() and response.chunked
        assert not has_both, f"both framings forwarded:\n{response.describe()}"


def test_upstream_differing_lengths_502(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    """Differing Content-Length values in a response: the proxy MUST send 502.

    RFC 9112 section 6.3 rule 5: a proxy discards such a response, closes the
    upstream connection and sends 502 (Bad Gateway).
    """
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n"
    upstream.handler = raw(head + b"hello!!", close=True)
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/differing-lengths"))
        response = conn.read_response()
    assert response.status == 502, response.describe()
    assert proxy.access_for_path("/differing-lengths")["failure"] == "bad_response"


def test_upstream_obs_fold_not_forwarded(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    """obs-fold in a response: 502, or folded into spaces (RFC 9112 5.2)."""
    head = b"HTTP/1.1 200 OK\r\nX-Folded: first\r\n second\r\nContent-Length: 2\r\n\r\n"
    upstream.handler = raw(head + b"ok")
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/folded-response"))
        response = conn.read_response()
    assert response.status in (200, 502), response.describe()
    if response.status == 200:
        folded = response.header("x-folded") or ""
        assert "second" in folded, f"the folded line was lost: {folded!r}"
        continued = [name for name, _ in response.headers if name[:1] in (" ", "\t")]
        assert continued == [], "pgproxy forwarded the folded line as it was"


def send_until_closed(
    conn: RawConnection, head: bytes, pieces: Iterator[bytes]
) -> None:
    """Send `head`, then each piece, until pgproxy stops reading."""
    conn.send(head)
    try:
        for piece in pieces:
            conn.send(piece)
    except OSError:
        pass  # pgproxy responded and closed before the client finished


def test_chunk_extension_flood_rejected(proxy: PgproxyProcess) -> None:
    head = build_request(
        "POST", "/ext-flood", headers=[("Transfer-Encoding", "chunked")]
    )
    # One chunk whose extension runs on for 1 MiB, sent 64 KiB at a time:
    # llhttp skips extensions, so only the framing budget stops it.
    pieces = iter([b"5;x="] + [b"a" * 65536] * 16)
    with RawConnection(proxy.port()) as conn:
        send_until_closed(conn, head, pieces)
        response = conn.read_response()
    assert response.status == 400, response.describe()
    assert b"chunk extensions or trailers too large" in response.body


def test_trailer_flood_rejected(proxy: PgproxyProcess) -> None:
    head = build_request(
        "POST", "/trailer-flood", headers=[("Transfer-Encoding", "chunked")]
    )
    trailers = b"X-Trailer: " + b"t" * 100 + b"\r\n"
    pieces = iter([chunk(b"hello") + b"0\r\n"] + [trailers * 600] * 16)
    with RawConnection(proxy.port()) as conn:
        send_until_closed(conn, head, pieces)
        response = conn.read_response()
    assert response.status == 400, response.describe()


def test_many_small_chunks_accepted(proxy: PgproxyProcess) -> None:
    head = build_request(
        "POST", "/small-chunks", headers=[("Transfer-Encoding", "chunked")]
    )
    # 20,000 one-byte chunks carry 200,000 bytes of framing, three times
    # max_header_bytes, but within 32 bytes per chunk.
    body = b"1;a=b\r\nx\r\n" * 20_000 + b"0\r\n\r\n"
    with RawConnection(proxy.port()) as conn:
        conn.send(head)
        for start in range(0, len(body), 65536):
            conn.send(body[start : start + 65536])
        document = echo_of(conn.read_response())
    assert document["body_length"] == 20_000


def test_pipelined_head_not_counted_as_framing(
    pgproxy_factory: PgproxyFactory, upstream: Upstream
) -> None:
    # With max_header_bytes at 1 KiB, the end of the first body (318 bytes,
    # with a trailer field) and the second request's 772-byte head arrive in
    # one read, and together they exceed the second request's 1 KiB budget.
    small = CONFIG.format(a=upstream.address).replace(
        'max_body_bytes = "64KiB"',
        'max_body_bytes = "64KiB"\nmax_header_bytes = "1KiB"',
    )
    proxy = pgproxy_factory(small)
    first = build_request("POST", "/first", headers=[("Transfer-Encoding", "chunked")])
    second = build_request(
        "POST", "/second", headers=[("Content-Length", "10"), ("X-Pad", "p" * 700)]
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(first + chunk(b"hello"))
        # The first read has been parsed once the upstream has the head, so
        # the next send arrives as a read that begins inside the first body.
        upstream.wait_for_requests(1)
        trailer = b"X-Trailer: " + b"t" * 300 + b"\r\n"
        conn.send(b"0\r\n" + trailer + b"\r\n" + second + b"01234")
        first_response = conn.read_response()
        conn.send(b"56789")
        second_response = conn.read_response()
    assert first_response.status == 200, first_response.describe()
    assert second_response.status == 200, second_response.describe()
    assert echo_of(second_response)["body_length"] == 10


def test_rejected_upload_read_until_close(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    head = build_request("POST", "/too-big", headers=[("Content-Length", "10000000")])
    with RawConnection(proxy.port()) as conn:
        conn.send(head + b"x" * 65536)
        response = conn.read_response()
        assert response.status == 413, response.describe()
        # pgproxy closed its side only: the rest of the upload is read and
        # discarded, so the client's sends meet no reset.
        try:
            for _ in range(8):
                conn.send(b"x" * 65536)
            assert not conn.is_open_after(2.0), "no EOF after the 413"
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            pytest.fail(f"pgproxy reset the connection during the upload: {exc}")
    assert upstream.requests == []


def test_lingering_ends_after_linger_timeout(proxy: PgproxyProcess) -> None:
    head = build_request("POST", "/too-big", headers=[("Content-Length", "10000000")])
    with RawConnection(proxy.port()) as conn:
        conn.send(head + b"x" * 1024)
        response = conn.read_response()
        assert response.status == 413, response.describe()
        started = time.monotonic()
        # A client that keeps its side open is read from until the linger
        # timeout (5 s), then closed: a later send meets the reset.
        reset_after = None
        while time.monotonic() - started < 20.0:
            try:
                conn.send(b"x" * 1024)
            except OSError:
                reset_after = time.monotonic() - started
                break
            time.sleep(0.2)
    assert reset_after is not None, "the lingering connection was still open after 20 s"
    assert reset_after >= 4.0, (
        f"closed {reset_after:.1f} s after the 413, before the linger timeout"
    )
