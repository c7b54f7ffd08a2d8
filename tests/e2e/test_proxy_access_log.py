"""The JSON access log written by a real pgproxy process, one object per line."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from e2e_client import RawConnection, build_request, echo_of
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
name = "fixed"
path = "/fixed"
respond = {{ status = 200, body = "fixed" }}

[[routes]]
name = "logged"
path_prefix = "/logged"
cluster = "a"
"""

CLUSTERS = """
[clusters.a]
endpoints = ["{a}"]
"""

KEYS = {
    "time",
    "client",
    "listener",
    "method",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "route",
    "cluster",
    "endpoint",
    "attempts",
    "failure",
    "upstream_status",
}


@pytest.fixture(scope="module")
def upstream(module_upstream_factory: UpstreamFactory) -> Upstream:
    return module_upstream_factory("a")


@pytest.fixture(scope="module")
def proxy(module_pgproxy_factory: PgproxyFactory, upstream: Upstream) -> PgproxyProcess:
    return module_pgproxy_factory((CONFIG + CLUSTERS).format(a=upstream.address))


def send(
    proxy: PgproxyProcess, method: str, target: str, body: bytes | None = None
) -> tuple[int, bytes]:
    """Send one request; return the client port and the raw response body."""
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request(method, target, body=body))
        response = conn.read_response(method)
        return conn.local_port, response.body


def assert_common(record: dict[str, Any], client_port: int) -> None:
    assert set(record) >= KEYS, (
        f"access record lacks {sorted(KEYS - set(record))}: {record}"
    )
    assert record["client"] == f"127.0.0.1:{client_port}"
    assert record["listener"] == "main"
    logged_at = datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00"))
    assert logged_at.utcoffset() == timedelta(0), (
        f"time should be UTC: {record['time']}"
    )
    assert abs(datetime.now(timezone.utc) - logged_at) < timedelta(minutes=5)
    assert (
        isinstance(record["duration_ms"], (int, float)) and record["duration_ms"] >= 0
    )


def test_proxied_request_record(proxy: PgproxyProcess, upstream: Upstream) -> None:
    request_body = b"twelve bytes"
    client_port, response_body = send(proxy, "POST", "/logged/item?id=7", request_body)
    record = proxy.wait_for_access(
        lambda r: str(r.get("path", "")).startswith("/logged/item")
    )[-1]
    assert_common(record, client_port)
    assert record["method"] == "POST"
    assert record["path"] in ("/logged/item?id=7", "/logged/item"), record
    assert record["status"] == 200
    assert record["upstream_status"] == 200
    assert record["route"] == "logged"
    assert record["cluster"] == "a"
    assert record["endpoint"] == upstream.address
    assert record["attempts"] == 1
    assert record["failure"] is None
    assert record["bytes_in"] >= len(request_body), record
    assert record["bytes_out"] >= len(response_body), record


def test_respond_route_record(proxy: PgproxyProcess) -> None:
    client_port, _ = send(proxy, "GET", "/fixed")
    record = proxy.access_for_path("/fixed")
    assert_common(record, client_port)
    assert record["status"] == 200
    assert record["route"] == "fixed"
    assert record["cluster"] is None
    assert record["endpoint"] is None
    assert record["upstream_status"] is None


def test_no_route_record(proxy: PgproxyProcess) -> None:
    client_port, _ = send(proxy, "GET", "/nowhere")
    record = proxy.access_for_path("/nowhere")
    assert_common(record, client_port)
    assert record["status"] == 404
    assert record["route"] is None
    assert record["endpoint"] is None


def test_error_reply_body_counted_in_bytes_out(proxy: PgproxyProcess) -> None:
    _, body = send(proxy, "GET", "/missing/counted")
    record = proxy.access_for_path("/missing/counted")
    assert record["status"] == 404
    assert body, "the 404 reply should carry a short text body"
    assert record["bytes_out"] == len(body), record


def test_error_reply_to_head_counts_no_body(proxy: PgproxyProcess) -> None:
    send(proxy, "HEAD", "/missing/head")
    record = proxy.access_for_path("/missing/head")
    assert record["status"] == 404
    assert record["bytes_out"] == 0, record


def test_malformed_request_record(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port()) as conn:
        conn.send(b"GET /malformed/dup HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        response = conn.read_response("GET")
        client_port = conn.local_port
    record = proxy.access_for_path("/malformed/dup")
    assert response.status == 400
    assert_common(record, client_port)
    assert record["status"] == 400
    assert record["method"] == "-"
    assert record["failure"] == "bad_request"
    assert record["route"] is None
    assert record["attempts"] == 0
    assert record["bytes_out"] == len(response.body), record


def test_one_record_per_request(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port()) as conn:
        for index in range(3):
            conn.send(build_request("GET", f"/logged/count/{index}"))
            echo_of(conn.read_response())
    records = proxy.wait_for_access(
        lambda r: str(r.get("path", "")).startswith("/logged/count/"), count=3
    )
    assert sorted(r["path"] for r in records) == [
        f"/logged/count/{i}" for i in range(3)
    ]


def test_stdout_is_only_json(proxy: PgproxyProcess) -> None:
    send(proxy, "GET", "/logged/json-only")
    proxy.access_for_path("/logged/json-only")
    assert len(proxy.access_records()) == len(
        [line for line in proxy.stdout_lines if line.strip()]
    ), "stdout should hold only JSON access records"


# The Apache/nginx combined format: host ident user [time] "request" status
# bytes "referer" "user-agent", optionally followed by extra fields.
COMBINED_RE = re.compile(
    r'^127\.0\.0\.1 \S+ \S+ \[[^\]]+\] "GET /logged/combined\?x=1 HTTP/1\.1" '
    r'200 \d+ "https://ref\.example/" "probe/1\.0"( .*)?$'
)


def test_combined_format(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    upstream = upstream_factory("a")
    config = (CONFIG + CLUSTERS).format(a=upstream.address)
    proxy = pgproxy_factory(
        config.replace('access_log = "json"', 'access_log = "combined"')
    )
    headers = [("Referer", "https://ref.example/"), ("User-Agent", "probe/1.0")]
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/logged/combined?x=1", headers=headers))
        echo_of(conn.read_response())
    deadline = time.monotonic() + 5
    while not proxy.stdout_lines and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(proxy.stdout_lines) == 1, (
        f"expected one access line: {proxy.stdout_lines}"
    )
    line = proxy.stdout_lines[0]
    assert COMBINED_RE.match(line), (
        "not in the Apache/nginx combined format, which ends in the quoted "
        f'"Referer" and "User-Agent" after the byte count: {line!r}'
    )


def test_access_log_off(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    upstream = upstream_factory("a")
    config = (CONFIG + CLUSTERS).format(a=upstream.address)
    proxy = pgproxy_factory(config.replace('access_log = "json"', 'access_log = "off"'))
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/logged/quiet"))
        echo_of(conn.read_response())
    # A request that pgproxy finished and a second one both leave nothing.
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/fixed"))
        conn.read_response()
    assert upstream.requests_to("/logged/quiet"), (
        "the request did not reach the upstream"
    )
    assert proxy.stdout_lines == [], (
        f"access_log = off still wrote: {proxy.stdout_lines}"
    )
