"""WebSocket and Upgrade through a real pgproxy process.

After the upstream responds 101, pgproxy tunnels bytes both ways until either
side closes; the `websockets` client checks the handshake and frames.
"""

from __future__ import annotations

import socket
import time

import pytest
from e2e_client import RawConnection, build_request, echo_of, echoed_header
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import (
    ReceivedRequest,
    UpstreamConnection,
    UpstreamFactory,
    WebSocketUpstream,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
path_prefix = "/ws"
cluster = "ws"

[[routes]]
path_prefix = "/plain"
cluster = "plain"

[clusters.ws]
endpoints = ["{ws}"]

[clusters.plain]
endpoints = ["{plain}"]
"""


@pytest.fixture
def proxy(
    pgproxy_factory: PgproxyFactory,
    websocket_upstream: WebSocketUpstream,
    upstream_factory: UpstreamFactory,
) -> PgproxyProcess:
    plain = upstream_factory("plain")
    return pgproxy_factory(
        CONFIG.format(ws=websocket_upstream.address, plain=plain.address)
    )


def test_websocket_echo_round_trip(
    proxy: PgproxyProcess, websocket_upstream: WebSocketUpstream
) -> None:
    with connect(
        f"ws://127.0.0.1:{proxy.port()}/ws/echo", open_timeout=5, close_timeout=5
    ) as ws:
        ws.send("hello through pgproxy")
        assert ws.recv(timeout=5) == "hello through pgproxy"
        payload = bytes(range(256)) * 400
        ws.send(payload)
        assert ws.recv(timeout=5) == payload, (
            "a 100 KiB binary message changed in the tunnel"
        )
        for index in range(20):
            ws.send(f"message {index}")
        assert [ws.recv(timeout=5) for _ in range(20)] == [
            f"message {i}" for i in range(20)
        ]
    assert websocket_upstream.paths == ["/ws/echo"]


def test_websocket_connections_independent(proxy: PgproxyProcess) -> None:
    url = f"ws://127.0.0.1:{proxy.port()}/ws/pair"
    with connect(url, open_timeout=5) as first, connect(url, open_timeout=5) as second:
        first.send("first")
        second.send("second")
        assert second.recv(timeout=5) == "second"
        assert first.recv(timeout=5) == "first"


def test_upgrade_declined_is_plain_response(proxy: PgproxyProcess) -> None:
    """An upgrade request keeps Upgrade; a 200 is an ordinary response."""
    headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/plain/upgrade", headers=headers))
        document = echo_of(conn.read_response())
    assert echoed_header(document, "upgrade") == ["websocket"], (
        "an upgrade request must keep Upgrade"
    )
    connection = ", ".join(echoed_header(document, "connection")).lower()
    assert "upgrade" in connection, (
        f"an upgrade request must keep Connection: upgrade, got {connection!r}"
    )


IDLE_CONFIG = """
[listeners.main]
address = "127.0.0.1:0"
tunnel_idle_timeout = "1s"

[[routes]]
path_prefix = "/ws"
cluster = "ws"

[clusters.ws]
endpoints = ["{ws}"]
"""


@pytest.fixture
def idle_proxy(
    pgproxy_factory: PgproxyFactory, websocket_upstream: WebSocketUpstream
) -> PgproxyProcess:
    return pgproxy_factory(IDLE_CONFIG.format(ws=websocket_upstream.address))


def test_idle_tunnel_closed(idle_proxy: PgproxyProcess) -> None:
    url = f"ws://127.0.0.1:{idle_proxy.port()}/ws/idle"
    with connect(url, open_timeout=5, close_timeout=1) as ws:
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=15)
        closed_after = time.monotonic() - started
    assert closed_after >= 0.5, f"closed after {closed_after:.2f} s, before the limit"


def test_active_tunnel_outlives_idle_timeout(idle_proxy: PgproxyProcess) -> None:
    url = f"ws://127.0.0.1:{idle_proxy.port()}/ws/active"
    with connect(url, open_timeout=5) as ws:
        started = time.monotonic()
        index = 0
        # 2.5 s of traffic, a message every 0.1 s, over a 1 s idle limit.
        while time.monotonic() - started < 2.5:
            ws.send(f"ping {index}")
            assert ws.recv(timeout=5) == f"ping {index}"
            index += 1
            time.sleep(0.1)


UPGRADE_HEADERS = [("Connection", "Upgrade"), ("Upgrade", "raw-stream")]


def _switch_then_answer_after_eof(
    request: ReceivedRequest, conn: UpstreamConnection
) -> bool:
    """Switch protocols, read until the client's FIN, then send and close.

    A client of a raw stream protocol may close its write side at the end of
    its input and then read the rest of the output.
    """
    conn.send(
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Connection: Upgrade\r\nUpgrade: raw-stream\r\n\r\n"
    )
    received = b""
    while (data := conn.read_some(65536)) is not None:
        received += data
    conn.send(b"output after the client's FIN: got " + received)
    return False


def test_tunnel_half_close_keeps_output(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    upstream = upstream_factory("raw")
    upstream.handler = _switch_then_answer_after_eof
    # Without the 1 s tunnel idle limit, which a slow machine could reach.
    config = IDLE_CONFIG.replace('tunnel_idle_timeout = "1s"\n', "")
    proxy = pgproxy_factory(config.format(ws=upstream.address))
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/ws/stream", headers=UPGRADE_HEADERS))
        head = conn.read_head()
        assert head.status == 101, head.describe()
        conn.send(b"input")
        conn.sock.shutdown(socket.SHUT_WR)
        rest = conn.wait_closed()
    assert rest == b"output after the client's FIN: got input", (
        f"the upstream's output after the client's FIN was lost: {rest!r}"
    )
