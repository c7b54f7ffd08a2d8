"""Clients that half-close (shutdown SHUT_WR) after sending their requests.

A FIN after a request that asks to close the connection (Connection: close)
comes from a client that still reads, so pgproxy serves every request
received in full, then closes. After a keep-alive request the FIN means the
client gave up: the exchange is cancelled and logged as status 499 with
failure `client_closed`, as is a request cut short by the FIN. The upstream
answers after a delay, so the client's FIN reaches pgproxy before the
response does.
"""

from __future__ import annotations

import socket

import pytest
from e2e_client import RawConnection, build_request, echo_of
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory, by_path, delayed, echo

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
cluster = "a"

[clusters.a]
endpoints = ["{a}"]
"""

UPSTREAM_DELAY = 0.3
CLOSE = [("Connection", "close")]


@pytest.fixture(scope="module")
def upstream(module_upstream_factory: UpstreamFactory) -> Upstream:
    server = module_upstream_factory("a")
    server.handler = by_path({"/slow": delayed(UPSTREAM_DELAY, echo)}, default=echo)
    return server


@pytest.fixture(scope="module")
def proxy(module_pgproxy_factory: PgproxyFactory, upstream: Upstream) -> PgproxyProcess:
    return module_pgproxy_factory(CONFIG.format(a=upstream.address))


def test_half_closed_client_gets_response(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/slow/one", headers=CLOSE))
        conn.sock.shutdown(socket.SHUT_WR)
        response = conn.read_response()
        rest = conn.wait_closed()

    assert echo_of(response)["target"] == "/slow/one"
    assert rest == b"", "pgproxy kept the connection open after the last response"
    record = proxy.access_for_path("/slow/one")
    assert record["status"] == 200
    assert record["failure"] is None
    assert record["bytes_out"] == len(response.body)


def test_half_closed_pipeline_all_served(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port()) as conn:
        conn.send(
            build_request("GET", "/slow/first")
            + build_request("GET", "/second", headers=CLOSE)
        )
        conn.sock.shutdown(socket.SHUT_WR)
        first = conn.read_response()
        second = conn.read_response()
        rest = conn.wait_closed()

    assert echo_of(first)["target"] == "/slow/first"
    assert echo_of(second)["target"] == "/second"
    assert second.header("connection") == "close"
    assert rest == b""


def test_half_close_after_keep_alive_request_logged_499(
    proxy: PgproxyProcess,
) -> None:
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/slow/gave-up"))
        conn.sock.shutdown(socket.SHUT_WR)
        received = conn.wait_closed()

    assert received == b"", f"a client that gave up got a reply: {received!r}"
    record = proxy.access_for_path("/slow/gave-up")
    assert record["status"] == 499
    assert record["failure"] == "client_closed"
    assert record["bytes_out"] == 0


def test_half_close_mid_body_logged_499(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    head = build_request(
        "POST", "/slow/cut", headers=[("Content-Length", "10"), *CLOSE]
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(head + b"abc")
        conn.sock.shutdown(socket.SHUT_WR)
        received = conn.wait_closed()

    assert received == b"", f"a request cut by the half-close got a reply: {received!r}"
    record = proxy.access_for_path("/slow/cut")
    assert record["status"] == 499
    assert record["failure"] == "client_closed"
    assert record["bytes_out"] == 0
