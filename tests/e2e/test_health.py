"""Health checking through a real pgproxy process and real loopback upstreams.

Active checks take an endpoint out after `unhealthy_threshold` failed probes
and back after `healthy_threshold` good ones. Passive checks eject an
endpoint that fails real traffic. A cluster without any available endpoint
responds 503 with Retry-After, unless it is set to route to all endpoints.
"""

from __future__ import annotations

import time

from e2e_client import echo_of, request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory

INTERVAL_S = 1.0
JITTER = 1.1  # probes wait up to 10% longer than the interval
HEADER = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"
"""


def health_check(fall: int = 2, rise: int = 2, interval: str = "1s") -> str:
    return (
        f'path = "/healthz"\ninterval = "{interval}"\ntimeout = "300ms"\n'
        f"unhealthy_threshold = {fall}\nhealthy_threshold = {rise}\n"
    )


def upstream_of(proxy: PgproxyProcess, path: str) -> str:
    return str(echo_of(request(proxy.port(), target=path))["upstream"])


def wait_for_log(proxy: PgproxyProcess, text: str, timeout: float) -> float:
    """Wait for a stderr line containing `text`; return the seconds waited."""
    started = time.monotonic()
    line = proxy.wait_for_stderr(text, timeout)
    assert line is not None, (
        f"no log line with {text!r}; stderr:\n{proxy.stderr_text()}"
    )
    return time.monotonic() - started


def count_lines(proxy: PgproxyProcess, text: str) -> int:
    return sum(1 for line in proxy.stderr_lines if text in line)


def app_requests(upstream: Upstream) -> int:
    return len(upstream.requests_to("/app"))


def test_failing_endpoint_taken_out_and_back(
    upstream_factory: UpstreamFactory, pgproxy_factory: PgproxyFactory
) -> None:
    fall, rise = 2, 2
    good, flaky = upstream_factory("good"), upstream_factory("flaky")
    proxy = pgproxy_factory(
        HEADER
        + f"""
[[routes]]
path_prefix = "/app"
cluster = "api"

[clusters.api]
endpoints = ["{good.address}", "{flaky.address}"]

[clusters.api.health_check]
{health_check(fall, rise)}
"""
    )
    served = {upstream_of(proxy, f"/app/{i}") for i in range(4)}
    assert served == {"good", "flaky"}

    flaky.healthz_status = 500
    down_text = f"endpoint {flaky.address} of cluster api is unhealthy"
    taken_out_s = wait_for_log(proxy, down_text, timeout=10)
    print(f"taken out after {taken_out_s:.2f}s (fall={fall}, interval={INTERVAL_S}s)")
    assert taken_out_s <= INTERVAL_S * JITTER * fall + INTERVAL_S
    assert "http_status: status 500" in proxy.stderr_text()

    before = app_requests(flaky)
    served = {upstream_of(proxy, f"/app/down/{i}") for i in range(20)}
    assert served == {"good"}
    assert app_requests(flaky) == before

    flaky.healthz_status = 200
    up_text = f"endpoint {flaky.address} of cluster api is healthy again"
    taken_back_s = wait_for_log(proxy, up_text, timeout=10)
    print(f"taken back after {taken_back_s:.2f}s (rise={rise}, interval={INTERVAL_S}s)")
    assert taken_back_s <= INTERVAL_S * JITTER * rise + INTERVAL_S
    served = {upstream_of(proxy, f"/app/up/{i}") for i in range(4)}
    assert served == {"good", "flaky"}

    assert count_lines(proxy, down_text) == 1
    assert count_lines(proxy, up_text) == 1


def test_refusing_endpoint_ejected_passively(
    upstream_factory: UpstreamFactory,
    pgproxy_factory: PgproxyFactory,
    dead_address: str,
) -> None:
    good = upstream_factory("good")
    # The startup probe round records one failure of the refusing endpoint,
    # below the threshold of 3, and the next round is an hour away. So only
    # passive ejection can take it out during this test.
    proxy = pgproxy_factory(
        HEADER
        + f"""
[[routes]]
path_prefix = "/app"
cluster = "api"
retries = 1

[clusters.api]
endpoints = ["{good.address}", "{dead_address}"]

[clusters.api.health_check]
{health_check(fall=3, interval="1h")}

[clusters.api.outlier_detection]
consecutive_failures = 3
base_ejection_time = "1m"
"""
    )
    ejected_text = f"endpoint {dead_address} of cluster api is ejected"
    for i in range(12):
        response = request(proxy.port(), target=f"/app/warm/{i}")
        assert response.status == 200
    wait_for_log(proxy, ejected_text, timeout=5)
    line = proxy.wait_for_stderr(ejected_text)
    assert line is not None
    assert "3 failures in a row" in line
    assert (
        count_lines(proxy, f"endpoint {dead_address} of cluster api is unhealthy") == 0
    )

    for i in range(20):
        assert upstream_of(proxy, f"/app/after/{i}") == "good"
    records = proxy.wait_for_access(
        lambda r: str(r.get("path", "")).startswith("/app/after/"), count=20
    )
    assert all(r["attempts"] == 1 for r in records)
    assert all(r["endpoint"] == good.address for r in records)


def test_all_endpoints_down(
    upstream_factory: UpstreamFactory, pgproxy_factory: PgproxyFactory
) -> None:
    upstreams = {name: upstream_factory(name) for name in ("a", "b", "c", "d")}
    for upstream in upstreams.values():
        upstream.healthz_status = 503
    check = health_check(fall=1, rise=1, interval="500ms")
    proxy = pgproxy_factory(
        HEADER
        + f"""
[[routes]]
path_prefix = "/fail"
cluster = "fail"

[[routes]]
path_prefix = "/all"
cluster = "all"

[clusters.fail]
endpoints = ["{upstreams["a"].address}", "{upstreams["b"].address}"]
when_all_unhealthy = "fail"

[clusters.fail.health_check]
{check}

[clusters.all]
endpoints = ["{upstreams["c"].address}", "{upstreams["d"].address}"]
when_all_unhealthy = "route_to_all"

[clusters.all.health_check]
{check}
"""
    )
    for name, cluster in (("a", "fail"), ("b", "fail"), ("c", "all"), ("d", "all")):
        text = f"endpoint {upstreams[name].address} of cluster {cluster} is unhealthy"
        wait_for_log(proxy, text, timeout=10)

    before = sum(len(upstreams[n].requests_to("/fail")) for n in "ab")
    response = request(proxy.port(), target="/fail/x")
    assert response.status == 503
    retry_after = response.header("retry-after")
    assert retry_after is not None
    assert retry_after.isdigit()
    assert int(retry_after) >= 1
    app_total = sum(len(upstreams[n].requests_to("/fail")) for n in "ab")
    assert app_total == before

    served = {upstream_of(proxy, f"/all/{i}") for i in range(4)}
    assert served == {"c", "d"}

    upstreams["a"].healthz_status = 200
    wait_for_log(
        proxy, f"endpoint {upstreams['a'].address} of cluster fail is healthy", 10
    )
    assert upstream_of(proxy, "/fail/y") == "a"
