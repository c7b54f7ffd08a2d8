"""End-to-end tests of `[clusters.NAME] max_connections`.

A request that finds its endpoint at the limit waits for a connection to
come free, up to connect_timeout, then gets 503 with the flag
upstream_overflow. The endpoint is not blamed: no health failure, no
ejection. The upstream never accepts more connections than the limit.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from e2e_admin import admin_port, labels, samples, status_json
from e2e_client import RawConnection, build_request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import (
    Handler,
    ReceivedRequest,
    Upstream,
    UpstreamConnection,
    UpstreamFactory,
    by_path,
    fixed,
    gated,
)
from test_proxy_lifecycle import BackgroundRequest

CONFIG = """
[server]
admin = "127.0.0.1:0"
drain_timeout = "1s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
path_prefix = "/"
cluster = "api"

[clusters.api]
endpoints = ["{api}"]
max_connections = 1
connect_timeout = "{wait}"

[clusters.api.outlier_detection]
consecutive_failures = 1
"""

WAITING = "pgproxy_pool_waiting_requests"


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def wait_for_waiting(admin: int, endpoint: str, count: int) -> float:
    """Poll /metrics (bounded) until `count` requests wait; return the last value."""
    key = (WAITING, labels(cluster="api", endpoint=endpoint))
    value = -1.0
    for _ in range(100):
        value = samples(admin).get(key, -1.0)
        if value == count:
            break
        time.sleep(0.05)
    return value


def test_second_request_waits_for_the_connection(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    gate: threading.Event,
) -> None:
    api = upstream_factory("api")
    api.handler = by_path(
        {"/slow": gated(gate, fixed(200, b"slow"))}, fixed(200, b"ok")
    )
    proxy = pgproxy_factory(CONFIG.format(api=api.address, wait="20s"))
    admin, port = admin_port(proxy), proxy.port("main")

    slow = BackgroundRequest(port, "/slow")
    slow.start()
    api.wait_for_requests(1)
    queued = BackgroundRequest(port, "/queued")
    queued.start()
    waiting = wait_for_waiting(admin, api.address, 1)
    connections_while_waiting = api.open_connections
    gate.set()
    slow.join(20)
    queued.join(20)

    assert waiting == 1
    assert connections_while_waiting == 1
    assert slow.response is not None and slow.response.status == 200
    assert queued.response is not None and queued.response.status == 200
    assert queued.response.body == b"ok"
    assert api.connections_accepted == 1
    assert wait_for_waiting(admin, api.address, 0) == 0


def test_wait_ends_with_503_overflow(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    gate: threading.Event,
) -> None:
    api = upstream_factory("api")
    api.handler = by_path(
        {"/slow": gated(gate, fixed(200, b"slow"))}, fixed(200, b"ok")
    )
    proxy = pgproxy_factory(CONFIG.format(api=api.address, wait="200ms"))
    admin, port = admin_port(proxy), proxy.port("main")

    slow = BackgroundRequest(port, "/slow")
    slow.start()
    api.wait_for_requests(1)
    overflows = [BackgroundRequest(port, f"/overflow/{i}") for i in range(3)]
    for request in overflows:
        request.start()
        request.join(20)
    gate.set()
    slow.join(20)
    after = BackgroundRequest(port, "/after")
    after.start()
    after.join(20)

    for request in overflows:
        assert request.response is not None
        assert request.response.status == 503
        assert request.response.header("retry-after") is not None
        assert b"upstream_overflow" in request.response.body
    assert slow.response is not None and slow.response.status == 200
    # Three overflows with consecutive_failures = 1 eject nothing.
    assert after.response is not None and after.response.status == 200
    assert status_json(admin)["clusters"]["api"][api.address]["status"] == "healthy"
    failures = samples(admin).get(
        (
            "pgproxy_upstream_failures_total",
            labels(cluster="api", endpoint=api.address, failure="upstream_overflow"),
        )
    )
    assert failures == 3
    overflowed = proxy.wait_for_access(
        lambda record: record.get("failure") == "upstream_overflow", count=3
    )
    assert len(overflowed) == 3
    assert len(api.requests_to("/overflow")) == 0


def send_burst(proxy: PgproxyProcess, admin: int, count: int) -> list[int]:
    """Send `count` requests that the proxy reads in one loop iteration.

    Return the response statuses in order.
    """
    clients = [RawConnection(proxy.port("main"), timeout=20) for _ in range(count)]
    accepted = ("pgproxy_downstream_connections_open", labels(listener="main"))
    for _ in range(100):
        if samples(admin).get(accepted) == count:
            break
        time.sleep(0.05)
    # Stopped, the proxy reads every request in the same iteration when it
    # continues, because they are all in its socket buffers by then.
    os.kill(proxy.pid, signal.SIGSTOP)
    try:
        for i, client in enumerate(clients):
            client.send(build_request("GET", f"/burst/{i}"))
        time.sleep(0.2)
    finally:
        os.kill(proxy.pid, signal.SIGCONT)
    statuses = [client.read_response(timeout=20).status for client in clients]
    for client in clients:
        client.close()
    return statuses


def counting_handler(api: Upstream, peak: list[int], keep_open: bool) -> Handler:
    """Reply 200 and record in `peak` the most connections open at once."""
    reply = fixed(200, b"ok")

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool:
        peak[0] = max(peak[0], api.open_connections)
        time.sleep(0.02)
        reply(request, conn)
        return keep_open

    return handle


def test_burst_stays_under_limit(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
) -> None:
    # Requests read in one event loop iteration each start a connect task,
    # so each must count its connection before that task runs.
    api = upstream_factory("api")
    peak = [0]
    api.handler = counting_handler(api, peak, keep_open=True)
    proxy = pgproxy_factory(CONFIG.format(api=api.address, wait="20s"))
    admin = admin_port(proxy)

    statuses = send_burst(proxy, admin, 10)

    assert statuses == [200] * 10
    assert peak[0] == 1
    assert wait_for_waiting(admin, api.address, 0) == 0


def test_keep_alive_race_repeat_under_limit(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
) -> None:
    # The upstream closes each connection after its response, without
    # Connection: close, so a woken waiter finds the connection just
    # released closed. The repeat on a fresh connection must wait for a
    # slot, and then not reuse another idle connection.
    api = upstream_factory("api")
    peak = [0]
    api.handler = counting_handler(api, peak, keep_open=False)
    proxy = pgproxy_factory(CONFIG.format(api=api.address, wait="20s"))
    admin = admin_port(proxy)

    statuses = send_burst(proxy, admin, 10)

    assert statuses == [200] * 10
    assert peak[0] == 1
    assert wait_for_waiting(admin, api.address, 0) == 0
