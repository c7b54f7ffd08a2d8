"""Process log lines about failed requests stay few when every request fails.

Every failure is in the access log. The process log keeps the first line of
each kind per second and counts the ones it left out, also when the
failures stop.
"""

from __future__ import annotations

import math
import re
import socket
import time

from e2e_client import request
from e2e_process import PgproxyFactory, PgproxyProcess
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
COUNTED = re.compile(r"\((\d+) more like this since the last such line\)$")


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
    assert proxy.wait_for_stderr(FAILED, timeout=5.0) is not None

    lines = failed_lines(proxy)
    # Taken after the lines, because lines that report left-out ones can
    # follow the last request.
    elapsed = time.monotonic() - started
    # One line per started second at most, where each request would log one.
    assert 1 <= len(lines) <= math.ceil(elapsed) + 1, lines
    assert "more like this" not in lines[0]


def failed_lines(proxy: PgproxyProcess) -> list[str]:
    return [line for line in proxy.stderr_lines if FAILED in line]


def lines_represented(lines: list[str]) -> int:
    """Return the failures that `lines` stand for: each, plus the ones it counts."""
    total = 0
    for line in lines:
        match = COUNTED.search(line)
        total += 1 + (int(match.group(1)) if match else 0)
    return total


def test_left_out_lines_reported_when_failures_stop(
    pgproxy_factory: PgproxyFactory,
) -> None:
    proxy = pgproxy_factory(CONFIG.format(port=closed_port()))
    for _ in range(5):
        assert request(proxy.port()).status == 502

    # No request follows, so the process must report the left-out lines on
    # its own, within about a second and a half of the last one.
    deadline = time.monotonic() + 10.0
    while lines_represented(failed_lines(proxy)) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = failed_lines(proxy)
    assert lines_represented(lines) == 5, lines
    assert len(lines) >= 2, lines
    assert "more like this" not in lines[0]
    assert COUNTED.search(lines[-1]) is not None, lines
    assert "connection refused (" in lines[-1]


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
    assert proxy.wait_for_stderr("is outside 100-599", timeout=5.0) is not None

    lines = failed_lines(proxy)
    elapsed = time.monotonic() - started
    assert 1 <= len(lines) <= math.ceil(elapsed) + 1, lines
