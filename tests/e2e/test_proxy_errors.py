"""Upstream failures through a real pgproxy process: error mapping and retries.

Every failure must map to its status: 502 for a connect failure, a bad
response or a reset before the response head, 503 with Retry-After when no
endpoint can serve, and 504 on a timeout. Each error carries a short
text/plain body and leaves a failure flag in the access log. Retries follow
the route's policy: by default only a request that provably never reached an
upstream is retried.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from e2e_client import RawConnection, Response, build_request, echo_of, request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import (
    Upstream,
    UpstreamFactory,
    close_after_request,
    fixed,
    hang,
    raw,
)

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
name = "dead-first"
path_prefix = "/dead-first"
cluster = "dead-first"

[[routes]]
name = "all-dead"
path_prefix = "/all-dead"
cluster = "all-dead"

[[routes]]
name = "garbage"
path_prefix = "/garbage"
cluster = "garbage"

[[routes]]
name = "reset"
path_prefix = "/reset"
cluster = "reset"

[[routes]]
name = "closed-on-accept"
path_prefix = "/closed-on-accept"
cluster = "closed-on-accept"

[[routes]]
name = "client-gone"
path_prefix = "/client-gone"
cluster = "client-gone"

[[routes]]
name = "hang"
path_prefix = "/hang"
cluster = "hang"

[[routes]]
name = "route-timeout"
path_prefix = "/route-timeout"
cluster = "patient"
timeout = "1s"

[[routes]]
name = "blackhole"
path_prefix = "/blackhole"
cluster = "blackhole"
retries = 0

[[routes]]
name = "down"
path_prefix = "/down"
cluster = "down"

[[routes]]
name = "retry-default"
path_prefix = "/retry-default"
cluster = "retry-default"

[[routes]]
name = "retry-reset"
path_prefix = "/retry-reset"
cluster = "retry-reset"
retry_on = ["connect-failure", "reset-before-response"]

[[routes]]
name = "retry-status"
path_prefix = "/retry-status"
cluster = "retry-status"
retries = 1
retry_on = ["connect-failure", 503]

[[routes]]
name = "retry-status-sole"
path_prefix = "/retry-status-sole"
cluster = "retry-status-sole"
retries = 1
retry_on = ["connect-failure", 503]

[clusters.dead-first]
endpoints = ["{dead}", "{live}"]

[clusters.all-dead]
endpoints = ["{dead}"]

[clusters.garbage]
endpoints = ["{garbage}"]

[clusters.reset]
endpoints = ["{reset}"]

[clusters.closed-on-accept]
endpoints = ["{closer}"]

[clusters.client-gone]
endpoints = ["{gone}"]

[clusters.hang]
endpoints = ["{hang}"]
response_header_timeout = "1s"

[clusters.patient]
endpoints = ["{hang}"]
response_header_timeout = "30s"

[clusters.blackhole]
endpoints = ["{blackhole}"]
connect_timeout = "1s"

[clusters.down]
endpoints = ["{down}"]

[clusters.down.health_check]
path = "/healthz"
interval = "200ms"
timeout = "100ms"
healthy_threshold = 1
unhealthy_threshold = 1

[clusters.retry-default]
endpoints = ["{x}", "{y}"]

[clusters.retry-default.outlier_detection]
enabled = false

[clusters.retry-reset]
endpoints = ["{rx}", "{ry}"]

[clusters.retry-reset.outlier_detection]
enabled = false

[clusters.retry-status]
endpoints = ["{s503}", "{ok}"]

[clusters.retry-status.outlier_detection]
enabled = false

[clusters.retry-status-sole]
endpoints = ["{s503}"]

[clusters.retry-status-sole.outlier_detection]
enabled = false
"""

NAMES = [
    "live",
    "garbage",
    "reset",
    "closer",
    "gone",
    "hang",
    "down",
    "x",
    "y",
    "rx",
    "ry",
    "s503",
    "ok",
]
TIMEOUT_BOUND = 8.0  # generous bound on a 1s timeout, for a loaded machine


@pytest.fixture(scope="module")
def blackhole() -> Iterator[str]:
    """An address whose accept queue is full, so new connections time out.

    With a backlog of 0 the kernel queues one connection; the fixture makes
    it and never accepts, so every later SYN is dropped.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    filler = socket.create_connection(address, timeout=2)
    yield f"127.0.0.1:{address[1]}"
    filler.close()
    listener.close()


@pytest.fixture(scope="module")
def module_dead_address() -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture(scope="module")
def upstreams(module_upstream_factory: UpstreamFactory) -> dict[str, Upstream]:
    return {name: module_upstream_factory(name) for name in NAMES}


@pytest.fixture(autouse=True)
def behaviours(upstreams: dict[str, Upstream]) -> Iterator[None]:
    for upstream in upstreams.values():
        upstream.reset()
    upstreams["garbage"].handler = raw(
        b"this is not an HTTP response\r\n\r\n", close=True
    )
    upstreams["reset"].handler = close_after_request
    upstreams["hang"].handler = hang
    upstreams["gone"].handler = hang
    upstreams["closer"].on_accept = "close"
    upstreams["down"].healthz_status = 500
    upstreams["x"].handler = close_after_request
    upstreams["rx"].handler = close_after_request
    upstreams["s503"].handler = fixed(503, b"unavailable\n")
    yield


@pytest.fixture(scope="module")
def proxy(
    module_pgproxy_factory: PgproxyFactory,
    upstreams: dict[str, Upstream],
    module_dead_address: str,
    blackhole: str,
) -> PgproxyProcess:
    addresses = {name: upstream.address for name, upstream in upstreams.items()}
    upstreams["down"].healthz_status = 500
    return module_pgproxy_factory(
        CONFIG.format(dead=module_dead_address, blackhole=blackhole, **addresses)
    )


def assert_error(response: Response, status: int) -> None:
    assert response.status == status, f"expected {status}, got:\n{response.describe()}"
    assert (response.header("content-type") or "").startswith("text/plain"), (
        response.describe()
    )
    assert 0 < len(response.body) < 1024, (
        f"expected a short body, got {response.body[:200]!r}"
    )


def test_dead_endpoint_skipped(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    live = upstreams["live"]
    for index in range(6):
        response = request(proxy.port(), "GET", f"/dead-first/{index}")
        assert echo_of(response)["upstream"] == "live", (
            f"request {index}: {response.describe()}"
        )
    assert len(live.requests) == 6
    records = proxy.wait_for_access(
        lambda r: str(r.get("path", "")).startswith("/dead-first/"), count=6
    )
    retried = [r for r in records if r["attempts"] == 2]
    assert retried, (
        f"no request shows a skipped dead endpoint (attempts = 2): {records}"
    )
    for record in retried:
        assert record["endpoint"] == live.address, record
        assert record["status"] == 200, record


def test_connect_failure_502(proxy: PgproxyProcess) -> None:
    assert_error(request(proxy.port(), "GET", "/all-dead"), 502)
    assert proxy.access_for_path("/all-dead")["failure"] == "connect_failure"


def test_bad_response_502(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    assert_error(request(proxy.port(), "GET", "/garbage"), 502)
    assert proxy.access_for_path("/garbage")["failure"] == "bad_response"
    assert len(upstreams["garbage"].requests) == 1, (
        "a GET after the upstream read it must not be retried by default"
    )


def test_reset_before_response_502(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    assert_error(request(proxy.port(), "GET", "/reset"), 502)
    assert proxy.access_for_path("/reset")["failure"] == "upstream_reset"
    assert len(upstreams["reset"].requests) == 1


def test_closed_on_accept_502(proxy: PgproxyProcess) -> None:
    assert_error(request(proxy.port(), "GET", "/closed-on-accept"), 502)
    record = proxy.access_for_path("/closed-on-accept")
    assert record["failure"] is not None, record


def test_client_close_cancels_upstream(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    """A client that leaves mid-request frees the upstream connection."""
    upstream = upstreams["gone"]
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/client-gone"))
        upstream.wait_for_requests(1)
    deadline = time.monotonic() + 5
    while upstream.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.open_connections == 0, (
        "pgproxy kept the upstream request open after the client went away"
    )
    assert proxy.access_for_path("/client-gone")["failure"] == "client_closed"


def test_upstream_never_answers_504(proxy: PgproxyProcess) -> None:
    started = time.monotonic()
    response = request(proxy.port(), "GET", "/hang", timeout=TIMEOUT_BOUND)
    elapsed = time.monotonic() - started
    assert_error(response, 504)
    assert elapsed < TIMEOUT_BOUND
    record = proxy.access_for_path("/hang")
    assert record["failure"] == "upstream_timeout", record
    assert record["attempts"] == 1, "a timeout is not retried by default"


def test_route_timeout_504(proxy: PgproxyProcess) -> None:
    started = time.monotonic()
    response = request(proxy.port(), "GET", "/route-timeout", timeout=TIMEOUT_BOUND)
    assert_error(response, 504)
    assert time.monotonic() - started < TIMEOUT_BOUND
    assert proxy.access_for_path("/route-timeout")["failure"] == "route_timeout"


def test_connect_timeout_504(proxy: PgproxyProcess) -> None:
    started = time.monotonic()
    response = request(proxy.port(), "GET", "/blackhole", timeout=TIMEOUT_BOUND)
    assert_error(response, 504)
    assert time.monotonic() - started < TIMEOUT_BOUND


def test_no_healthy_endpoint_503(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    deadline = time.monotonic() + 5
    response = request(proxy.port(), "GET", "/down/0")
    attempt = 0
    while response.status != 503 and time.monotonic() < deadline:
        time.sleep(0.1)
        attempt += 1
        response = request(proxy.port(), "GET", f"/down/{attempt}")
    assert_error(response, 503)
    retry_after = response.header("retry-after")
    assert retry_after is not None and retry_after.isdigit(), (
        f"a 503 should carry Retry-After in seconds, got {retry_after!r}"
    )
    assert proxy.access_for_path(f"/down/{attempt}")["failure"] == "no_healthy_endpoint"
    assert upstreams["down"].requests_to(f"/down/{attempt}") == []


def test_get_not_retried_after_send(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    """With the default policy a reset after the request was sent is not retried."""
    statuses = {}
    for index in range(2):
        statuses[f"/retry-default/get/{index}"] = request(
            proxy.port(), "GET", f"/retry-default/get/{index}"
        ).status
    assert sorted(statuses.values()) == [200, 502], (
        f"round robin over [reset, echo] gave {statuses}"
    )
    failed = next(path for path, status in statuses.items() if status == 502)
    assert len(upstreams["x"].requests_to(failed)) == 1
    assert upstreams["y"].requests_to(failed) == [], (
        f"{failed} was retried on another endpoint"
    )


def test_post_not_resent(proxy: PgproxyProcess, upstreams: dict[str, Upstream]) -> None:
    statuses = {}
    for index in range(2):
        path = f"/retry-default/post/{index}"
        statuses[path] = request(proxy.port(), "POST", path, body=b"pay once").status
    assert sorted(statuses.values()) == [200, 502], (
        f"round robin over [reset, echo] gave {statuses}"
    )
    failed = next(path for path, status in statuses.items() if status == 502)
    seen_by_x = upstreams["x"].requests_to(failed)
    assert len(seen_by_x) == 1, f"the POST reached the upstream {len(seen_by_x)} times"
    assert seen_by_x[0].body == b"pay once", (
        "the upstream should have read the whole POST body"
    )
    assert upstreams["y"].requests_to(failed) == [], (
        "a POST the upstream read was sent again"
    )


def test_status_retry_for_get(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    for index in range(4):
        response = request(proxy.port(), "GET", f"/retry-status/get/{index}")
        assert echo_of(response)["upstream"] == "ok", (
            f"GET {index} was not retried after a 503"
        )
    assert upstreams["s503"].requests_to("/retry-status/get/"), (
        "no GET hit the 503 endpoint first"
    )
    records = proxy.wait_for_access(
        lambda r: str(r.get("path", "")).startswith("/retry-status/get/"), count=4
    )
    assert any(r["attempts"] == 2 for r in records), records


def test_status_retry_without_other_endpoint(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    # The cluster's only endpoint returns 503. That response is relayed, not
    # replaced by pgproxy's own 503 for a cluster with no endpoint left.
    start = len(proxy.stderr_lines)
    response = request(proxy.port(), "GET", "/retry-status-sole/x")
    assert response.status == 503, response.describe()
    assert response.body == b"unavailable\n", response.describe()
    assert len(upstreams["s503"].requests_to("/retry-status-sole/")) == 1
    record = proxy.access_for_path("/retry-status-sole/x")
    assert record["attempts"] == 1, record
    # The throttle can log the retry lines that the test before left out,
    # which retried on "ok", an endpoint of another cluster, a second later.
    earlier = f"retrying on endpoint {upstreams['ok'].address}"
    retries = [
        line
        for line in proxy.stderr_lines[start:]
        if "retrying" in line and earlier not in line
    ]
    assert retries == []


def test_status_retry_not_for_post(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    failed = []
    for index in range(4):
        path = f"/retry-status/post/{index}"
        response = request(proxy.port(), "POST", path, body=b"once")
        assert response.status in (200, 503), response.describe()
        if response.status == 503:
            failed.append(path)
    assert failed, "no POST hit the 503 endpoint first"
    for path in failed:
        assert upstreams["ok"].requests_to(path) == [], (
            f"POST {path} was retried on a 503"
        )


def test_status_retry_with_idempotency_key(proxy: PgproxyProcess) -> None:
    for index in range(3):
        path = f"/retry-status/key/{index}"
        response = request(
            proxy.port(),
            "POST",
            path,
            headers=[("Idempotency-Key", f"k{index}")],
            body=b"x",
        )
        assert echo_of(response)["upstream"] == "ok", (
            f"POST with Idempotency-Key was not retried: {path}"
        )


def test_reset_retry_when_configured(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    """With reset-before-response in retry_on a GET reset by one endpoint is retried."""
    for index in range(4):
        response = request(proxy.port(), "GET", f"/retry-reset/{index}")
        assert echo_of(response)["upstream"] == "ry", (
            f"GET {index}: {response.describe()}"
        )
    reset_paths = [r.target for r in upstreams["rx"].requests]
    assert reset_paths, "no GET reached the resetting endpoint first"
    for path in reset_paths:
        assert len(upstreams["ry"].requests_to(path)) == 1, f"{path} was not retried"


def test_retry_log_names_endpoint(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    # Retry lines of one kind are logged once per second, and an earlier
    # test may have just logged this one, so requests go on until it shows.
    # Retry lines of other kinds, which earlier tests left out, can show up
    # meanwhile, so the wait is for this endpoint's line.
    rx, ry = upstreams["rx"].address, upstreams["ry"].address
    retry_line = f"request to endpoint {rx} failed ("
    start = len(proxy.stderr_lines)
    deadline = time.monotonic() + 10.0
    line = None
    index = 0
    while line is None and time.monotonic() < deadline:
        request(proxy.port(), "GET", f"/retry-reset/logged-{index}")
        index += 1
        line = proxy.wait_for_stderr(retry_line, 0.5, start=start)
    assert line is not None, proxy.stderr_text()
    assert "retrying on endpoint " in line, line
    assert line.split("retrying on endpoint ")[1].startswith(ry), line
