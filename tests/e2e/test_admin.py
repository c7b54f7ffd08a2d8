"""End-to-end tests of the admin listener of `pgproxy run`."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading

from e2e_admin import admin_port, get, labels, samples, status_json
from e2e_process import PgproxyFactory
from e2e_upstream import ReceivedRequest, UpstreamConnection, UpstreamFactory, fixed

CONFIG = """
[server]
admin = "127.0.0.1:0"
drain_timeout = "10s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
name = "api"
path_prefix = "/api"
cluster = "api"

[[routes]]
name = "flaky"
path_prefix = "/flaky"
cluster = "flaky"

[[routes]]
name = "hello"
path = "/hello"
respond = {{ status = 200, body = "hi" }}

[clusters.api]
endpoints = ["{api}"]

[clusters.flaky]
endpoints = ["{dead}", "{api}"]
outlier_detection = {{ consecutive_failures = 1, max_ejection_percent = 50 }}
"""


def _request_count(
    scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    route: str,
    cluster: str,
    status: str,
) -> float:
    key = labels(listener="main", route=route, cluster=cluster, status=status)
    return scraped.get(("pgproxy_requests_total", key), 0.0)


def test_metrics_count_requests(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    dead_address: str,
) -> None:
    api = upstream_factory("api")
    process = pgproxy_factory(CONFIG.format(api=api.address, dead=dead_address))
    admin, port = admin_port(process), process.port("main")
    before = samples(admin)

    for _ in range(7):
        assert get(port, "/api/x")[0] == 200
    for _ in range(3):
        assert get(port, "/nowhere")[0] == 404
    for _ in range(2):
        assert get(port, "/hello")[0] == 200
    after = samples(admin)

    def delta(route: str, cluster: str, status: str) -> float:
        return _request_count(after, route, cluster, status) - _request_count(
            before, route, cluster, status
        )

    assert delta("api", "api", "200") == 7
    assert delta("", "", "404") == 3
    assert delta("hello", "", "200") == 2
    histogram = labels(listener="main", route="api", cluster="api")
    assert after[("pgproxy_request_duration_seconds_count", histogram)] >= 7
    endpoint = labels(cluster="api", endpoint=api.address)
    assert after[("pgproxy_endpoint_healthy", endpoint)] == 1.0
    idle = labels(cluster="api", endpoint=api.address, state="idle")
    assert after[("pgproxy_pool_connections", idle)] >= 1
    assert ("process_cpu_seconds_total", ()) in after


def test_status_shows_ejection(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    dead_address: str,
) -> None:
    api = upstream_factory("api")
    process = pgproxy_factory(CONFIG.format(api=api.address, dead=dead_address))
    admin, port = admin_port(process), process.port("main")

    for _ in range(4):
        assert get(port, "/flaky")[0] == 200  # the dead endpoint is retried around
    document = status_json(admin)

    assert document["config"]["file"] == str(process.config_path)
    assert len(document["config"]["hash"]) == 64
    assert document["draining"] is False
    endpoints = document["clusters"]["flaky"]
    assert endpoints[dead_address]["status"] == "ejected"
    assert endpoints[api.address]["status"] == "healthy"
    # `since` is a reading of the same clock as `monotonic_now`, taken earlier.
    assert 0 <= document["monotonic_now"] - endpoints[dead_address]["since"] < 60
    scraped = samples(admin)
    dead = labels(cluster="flaky", endpoint=dead_address)
    assert scraped[("pgproxy_endpoint_ejections_total", dead)] >= 1
    assert scraped[("pgproxy_endpoint_healthy", dead)] == 0.0
    failures = labels(cluster="flaky", endpoint=dead_address, failure="connect_failure")
    assert scraped[("pgproxy_upstream_failures_total", failures)] >= 1


def test_check_upstreams_reads_admin(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    dead_address: str,
) -> None:
    api = upstream_factory("api")
    process = pgproxy_factory(CONFIG.format(api=api.address, dead=dead_address))
    admin, port = admin_port(process), process.port("main")
    assert get(port, "/flaky")[0] == 200

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgproxy",
            "check-upstreams",
            "--admin",
            f"127.0.0.1:{admin}",
            "--cluster",
            "flaky",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 1, result.stderr  # some down, cluster can serve
    report = json.loads(result.stdout)
    endpoints = {item["address"]: item for item in report["clusters"][0]["endpoints"]}
    assert endpoints[dead_address]["status"] == "ejected"
    assert endpoints[api.address]["status"] == "healthy"
    assert 0 <= endpoints[dead_address]["status_age_s"] < 60


def test_unknown_path_and_malformed_request(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    dead_address: str,
) -> None:
    api = upstream_factory("api")
    process = pgproxy_factory(CONFIG.format(api=api.address, dead=dead_address))
    admin = admin_port(process)

    assert get(admin, "/nope")[0] == 404
    with socket.create_connection(("127.0.0.1", admin), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400 ")


def test_healthz_fails_before_listeners_close(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    dead_address: str,
) -> None:
    api = upstream_factory("api")
    release = threading.Event()

    def slow(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        release.wait(10)
        return fixed(200, b"done")(request, conn)

    api.handler = slow
    process = pgproxy_factory(CONFIG.format(api=api.address, dead=dead_address))
    admin, port = admin_port(process), process.port("main")
    assert get(admin, "/healthz")[:2] == (200, b"ok\n")
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    client.request("GET", "/api/slow")
    api.wait_for_requests(1)

    process.signal(signal.SIGTERM)
    line = process.wait_for_stderr("/healthz", timeout=5.0)
    health = get(admin, "/healthz")
    release.set()
    response = client.getresponse()

    assert line is not None
    assert health[:2] == (503, b"draining\n")
    assert response.status == 200
    assert response.read() == b"done"
    client.close()
    assert process.wait_exit(15) == 0
    lines = process.stderr_lines
    failing = next(i for i, text in enumerate(lines) if "/healthz" in text)
    closing = next(i for i, text in enumerate(lines) if "stopped accepting" in text)
    assert failing < closing
