"""Process log lines about failed requests stay few when every request fails.

Every failure is in the access log. The process log keeps the first line of
each kind per second and counts the ones it left out.
"""

from __future__ import annotations

import math
import socket
import time

from e2e_client import request
from e2e_process import PgproxyFactory
from e2e_upstream import ReceivedRequest, UpstreamConnection, UpstreamFactory

CONFIG = """
[server]
access_log = "off"
drain_timeout = "1s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
cluster = "a"

[clusters.a]
endpoints = ["127.0.0.1:{port}"]
"""

FAILED = "request to endpoint"


def closed_port() -> int:
    """Return a loopback port that nothing listens on (it was just released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_repeated_failures_logged_once_per_second(
    pgproxy_factory: PgproxyFactory,
) -> None:
    proxy = pgproxy_factory(CONFIG.format(port=closed_port()))
    started = time.monotonic()
    for _ in range(40):
        assert request(proxy.port()).status == 502
    elapsed = time.monotonic() - started
    assert proxy.wait_for_stderr(FAILED, timeout=5.0) is not None

    lines = [line for line in proxy.stderr_lines if FAILED in line]
    # One line per started second at most, where each request would log one.
    assert 1 <= len(lines) <= math.ceil(elapsed) + 1, lines
    assert "more like this" not in lines[0]


def test_next_line_counts_left_out(pgproxy_factory: PgproxyFactory) -> None:
    proxy = pgproxy_factory(CONFIG.format(port=closed_port()))
    for _ in range(5):
        assert request(proxy.port()).status == 502
    time.sleep(1.2)
    assert request(proxy.port()).status == 502

    # The five requests logged one line and left out 4; the last one logs
    # again, with the count.
    counted = "connection refused (4 more like this since the last such line)"
    assert proxy.wait_for_stderr(counted, timeout=5.0) is not None
    lines = [line for line in proxy.stderr_lines if FAILED in line]
    assert len(lines) == 2, lines
    assert lines[1].endswith(counted)


def test_invalid_statuses_share_one_kind(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    # A faulty endpoint that sends a different invalid status code each time
    # must not get a line per request because each code is a new message.
    upstream = upstream_factory("a")
    statuses = iter(range(600, 1000))

    def invalid_status(request: ReceivedRequest, conn: UpstreamConnection) -> None:
        conn.send(b"HTTP/1.1 %d Odd\r\nContent-Length: 2\r\n\r\nok" % next(statuses))

    upstream.handler = invalid_status
    proxy = pgproxy_factory(CONFIG.format(port=upstream.port))
    started = time.monotonic()
    for _ in range(40):
        assert request(proxy.port()).status == 502
    elapsed = time.monotonic() - started
    assert proxy.wait_for_stderr("is outside 100-599", timeout=5.0) is not None

    lines = [line for line in proxy.stderr_lines if FAILED in line]
    assert 1 <= len(lines) <= math.ceil(elapsed) + 1, lines
