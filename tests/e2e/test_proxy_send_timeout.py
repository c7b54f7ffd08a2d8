"""The send timeout: clients that stop reading their response are dropped.

Each client caps its receive buffer and its MSS, so pgproxy's write buffer
fills with little data and `pause_writing` comes at once. The listener's
`send_timeout` is 1 s: a client that takes no bytes for that long is
aborted, with the access-log flag `send_timeout` on the exchange in
progress, and a client that keeps reading, however slowly, is not. The
bounds on time are loose on purpose: each test waits up to 15 s for what
should take about one.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import pytest
from e2e_client import RawConnection, build_request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import (
    ReceivedRequest,
    Upstream,
    UpstreamConnection,
    UpstreamFactory,
    big_body,
    by_path,
    pattern_bytes,
)

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"
send_timeout = "1s"

[[routes]]
path_prefix = "/fixed"
respond = {{ status = 200, body = "{fixed_body}" }}

[[routes]]
path_prefix = "/"
cluster = "a"
timeout = "60s"

[clusters.a]
endpoints = ["{a}"]
response_header_timeout = "30s"
"""

RCVBUF = 4096
MSS = 536
BIG = 8 * 1024 * 1024
BIG_SHA256 = hashlib.sha256(pattern_bytes(BIG)).hexdigest()
# Below the 256 KiB high-water mark of pgproxy's write buffer, so only
# close() can start the send timeout, and above what the kernel takes for
# a client with RCVBUF and MSS (about 100 KiB measured on Linux 6.18).
FIXED_BODY = "x" * (240 * 1024)
WAIT_S = 15.0


def _websocket_pusher(
    request: ReceivedRequest, conn: UpstreamConnection
) -> bool | None:
    """Accept a WebSocket upgrade, then send binary frames until the peer stops."""
    conn.send(
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    payload = pattern_bytes(65536)
    # FIN and binary opcode, then the length 65536 in the 64-bit extended form.
    frame = b"\x82\x7f" + len(payload).to_bytes(8, "big") + payload
    for _ in range(1024):  # 64 MiB at most
        conn.send(frame)
        if conn.closed:
            break
    return False


@pytest.fixture
def upstream(upstream_factory: UpstreamFactory) -> Upstream:
    upstream = upstream_factory("a")
    upstream.handler = by_path(
        {
            "/big": big_body(BIG),
            "/chunked": big_body(BIG, use_chunked=True),
            "/ws": _websocket_pusher,
        }
    )
    return upstream


@pytest.fixture
def proxy(pgproxy_factory: PgproxyFactory, upstream: Upstream) -> PgproxyProcess:
    config = CONFIG.format(a=upstream.address, fixed_body=FIXED_BODY)
    return pgproxy_factory(config, "--log-level", "DEBUG")


def _client(proxy: PgproxyProcess) -> RawConnection:
    return RawConnection(proxy.port(), timeout=WAIT_S, rcvbuf=RCVBUF, mss=MSS)


def _wait_until(condition: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _timeout_line(proxy: PgproxyProcess, port: int) -> str | None:
    """Return pgproxy's DEBUG line about the send timeout of client `port`."""
    client = f"client 127.0.0.1:{port} "
    for line in proxy.stderr_text().splitlines():
        if "send timeout" in line and client in line:
            return line
    return None


def _receive(conn: RawConnection, size: int) -> bytes:
    """Receive `size` bytes, or fewer when the connection ends first."""
    data = bytearray(conn.buffer[:size])
    conn.buffer = conn.buffer[size:]
    deadline = time.monotonic() + WAIT_S
    while len(data) < size and time.monotonic() < deadline:
        conn.sock.settimeout(max(deadline - time.monotonic(), 0.01))
        piece = conn.sock.recv(size - len(data))
        if not piece:
            break
        data += piece
    return bytes(data)


def test_stuck_client_aborted(proxy: PgproxyProcess, upstream: Upstream) -> None:
    with _client(proxy) as conn:
        port = conn.local_port
        started = time.monotonic()
        conn.send(build_request("GET", "/big"))
        record = proxy.wait_for_access(
            lambda r: r.get("path") == "/big", timeout=WAIT_S
        )[-1]
        elapsed = time.monotonic() - started
        received = conn.wait_closed(timeout=WAIT_S)
    assert record["failure"] == "send_timeout", record
    assert record["status"] == 200, record
    assert elapsed >= 0.9, f"aborted after {elapsed:.2f} s, before send_timeout"
    assert received is not None, "the client connection is still open"
    assert len(received) < BIG, "the client got the whole response"
    assert _timeout_line(proxy, port) is not None, proxy.stderr_text()[-2000:]
    # Mid-response, the upstream connection must be closed, not pooled.
    assert _wait_until(lambda: upstream.open_connections == 0), upstream


def _ending(conn: RawConnection) -> str:
    """Read until the connection ends; return "reset", "fin" or "open"."""
    conn.sock.settimeout(WAIT_S)
    try:
        while conn.sock.recv(65536):
            pass
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"
    return "fin"


def test_stuck_http10_client_reset(proxy: PgproxyProcess) -> None:
    # An HTTP/1.0 client reads a chunked upstream body until the close, so a
    # FIN would look like the end of the whole body.
    with _client(proxy) as conn:
        conn.send(b"GET /chunked HTTP/1.0\r\nHost: a\r\n\r\n")
        record = proxy.wait_for_access(
            lambda r: r.get("path") == "/chunked", timeout=WAIT_S
        )[-1]
        ending = _ending(conn)
    assert record["failure"] == "send_timeout", record
    assert ending == "reset", "a cut close-delimited body ended with a FIN"


def test_slow_reader_gets_whole_response(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    """A client taking 8 KiB every 0.3 s keeps its connection past send_timeout.

    At that pace pgproxy's writes stay paused for longer than the 1 s
    send_timeout (about 2 s measured), so the timer fires while the client
    is still reading and must start again instead of aborting.
    """
    with _client(proxy) as conn:
        port = conn.local_port
        conn.send(build_request("GET", "/big"))
        head = conn.read_head()
        assert head.status == 200, head.describe()
        length = int(head.header("content-length") or 0)
        digest = hashlib.sha256()
        bytes_read = 0
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            piece = _receive(conn, 8 * 1024)
            assert piece, f"connection closed after {bytes_read} bytes"
            digest.update(piece)
            bytes_read += len(piece)
            time.sleep(0.3)
        rest = _receive(conn, length - bytes_read)
        digest.update(rest)
    assert bytes_read + len(rest) == length
    assert digest.hexdigest() == BIG_SHA256
    record = proxy.access_for_path("/big")
    assert record["failure"] is None, record
    assert _timeout_line(proxy, port) is None


def test_closed_connection_with_unsent_bytes_aborted(proxy: PgproxyProcess) -> None:
    """A reply smaller than the high-water mark, then close(): still bounded.

    pgproxy closes the connection after the response to a request with
    `Connection: close`, and the transport then keeps the connection open
    until the client has read the rest of the reply.
    """
    with _client(proxy) as conn:
        port = conn.local_port
        conn.send(build_request("GET", "/fixed", [("Connection", "close")]))
        found = _wait_until(lambda: _timeout_line(proxy, port) is not None)
        received = conn.wait_closed(timeout=WAIT_S)
    assert found, f"no send timeout logged:\n{proxy.stderr_text()[-2000:]}"
    assert received is not None, "the client connection is still open"
    assert len(received) < len(FIXED_BODY), "the client got the whole response"


def test_stuck_websocket_client_aborted(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    with _client(proxy) as conn:
        port = conn.local_port
        conn.send(
            build_request(
                "GET",
                "/ws/push",
                [
                    ("Upgrade", "websocket"),
                    ("Connection", "Upgrade"),
                    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                    ("Sec-WebSocket-Version", "13"),
                ],
            )
        )
        head = conn.read_head()
        assert head.status == 101, head.describe()
        record = proxy.wait_for_access(
            lambda r: r.get("path") == "/ws/push", timeout=WAIT_S
        )[-1]
        received = conn.wait_closed(timeout=WAIT_S)
    assert record["failure"] == "send_timeout", record
    assert record["status"] == 101, record
    assert received is not None, "the client connection is still open"
    assert _timeout_line(proxy, port) is not None, proxy.stderr_text()[-2000:]
    assert _wait_until(lambda: upstream.open_connections == 0), upstream
