"""Rogue upstream responses against a running `pgproxy run`.

An upstream response that pgproxy rejects costs the client one 502 and
nothing else: no byte that the upstream sent may reach the client, or a
keep-alive client would read it as the start of its next response. A status
code outside 100-599 is invalid (RFC 9110 section 15): one below 100 is
neither relayed as an interim response nor waited past, and one above 599 is
not relayed as a final response. A response that fails after its head was
relayed must reach the client visibly cut.
"""

from __future__ import annotations

import socket
import struct

import pytest
from e2e_client import IncompleteResponse, RawConnection, build_request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import (
    ReceivedRequest,
    UpstreamConnection,
    UpstreamFactory,
    by_path,
    raw,
)

CONFIG = """
[server]
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
cluster = "a"

[clusters.a]
endpoints = ["{a}"]
response_header_timeout = "30s"
"""

SWITCH_WITH_DATA = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Connection: upgrade\r\nUpgrade: rogue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ninjected"
)


CUT_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
)


def _close_delimited_then_reset(
    request: ReceivedRequest, conn: UpstreamConnection
) -> bool:
    conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello")
    # A zero linger time makes close() send a reset (socket(7)).
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    return False


def _read_until_closed(port: int, request: bytes) -> tuple[bytes, str]:
    """Send `request` and read until the proxy closes; return the bytes and how."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                return received, "reset"
            if not data:
                return received, "eof"
            received += data


@pytest.fixture(scope="module")
def proxy(
    module_upstream_factory: UpstreamFactory, module_pgproxy_factory: PgproxyFactory
) -> PgproxyProcess:
    upstream = module_upstream_factory("a")
    upstream.handler = by_path(
        {
            "/switch": raw(SWITCH_WITH_DATA),
            "/status-0": raw(b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok"),
            "/status-99": raw(b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok"),
            "/status-599": raw(b"HTTP/1.1 599 Top\r\nContent-Length: 2\r\n\r\nok"),
            "/status-600": raw(b"HTTP/1.1 600 High\r\nContent-Length: 2\r\n\r\nok"),
            "/status-999": raw(b"HTTP/1.1 999 High\r\nContent-Length: 2\r\n\r\nok"),
            "/cut-chunked": raw(CUT_CHUNKED),
            "/close-reset": _close_delimited_then_reset,
        }
    )
    return module_pgproxy_factory(CONFIG.format(a=upstream.address))


def test_unrequested_switch_sends_no_upstream_bytes(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/switch"))
        response = conn.read_response()
        assert response.status == 502, response.describe()
        conn.send(build_request("GET", "/next"))
        try:
            following = conn.read_response()
        except IncompleteResponse:
            return  # closing the connection after the 502 is fine too
    assert following.body != b"injected", (
        "bytes after a rejected 101 reached the client as its next response"
    )
    assert following.status == 200, following.describe()


@pytest.mark.parametrize(
    "path", ["/status-0", "/status-99", "/status-600", "/status-999"]
)
def test_status_outside_range_is_bad_response(proxy: PgproxyProcess, path: str) -> None:
    with RawConnection(proxy.port(), timeout=10) as conn:
        conn.send(build_request("GET", path, headers=[("Connection", "close")]))
        response = conn.read_response()
        assert response.status == 502, response.describe()
        assert response.interim == [], "an invalid status was relayed as interim"
        assert response.body != b"ok", "the upstream's body was relayed"
        assert conn.buffer == b"", f"bytes after the 502: {conn.buffer!r}"
    record = proxy.access_for_path(path)
    assert record["failure"] == "bad_response"
    assert record["status"] == 502
    # Invalid status codes are one kind of failure line, logged once per
    # second, so the line may name the code of an earlier request.
    line = proxy.wait_for_stderr("is outside 100-599")
    assert line is not None, proxy.stderr_text()
    assert f"request to endpoint {record['endpoint']} failed" in line


def test_status_599_is_relayed(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port(), timeout=10) as conn:
        conn.send(build_request("GET", "/status-599"))
        response = conn.read_response()
    assert response.status == 599, response.describe()
    assert response.body == b"ok"
    assert proxy.access_for_path("/status-599")["failure"] is None


@pytest.mark.parametrize("path", ["/cut-chunked", "/close-reset"])
def test_cut_body_resets_http10_client(proxy: PgproxyProcess, path: str) -> None:
    request = f"GET {path} HTTP/1.0\r\nHost: test.local\r\n\r\n".encode()
    received, ending = _read_until_closed(proxy.port(), request)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received
    assert ending == "reset", (
        f"a cut close-delimited body ended with a FIN, as if complete: {received!r}"
    )
    assert proxy.access_for_path(path)["failure"] is not None


def test_reset_cuts_close_delimited_body(proxy: PgproxyProcess) -> None:
    request = build_request("GET", "/close-reset", headers=[("Connection", "close")])
    received, _ = _read_until_closed(proxy.port(), request)
    assert b"Transfer-Encoding: chunked\r\n" in received, received
    assert not received.endswith(b"0\r\n\r\n"), (
        "a body cut by the upstream's reset was relayed as complete"
    )
    assert proxy.access_for_path("/close-reset")["failure"] == "upstream_reset"
