"""End-to-end tests of active health checks with `[server] workers = 2`.

The supervisor probes every endpoint once per interval and forwards each
outcome to both workers, so an upstream receives the probes of one process,
both workers take a failing endpoint out, and the change is logged once.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from e2e_admin import admin_port, get, status_json
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory

INTERVAL_S = 0.3
TIMEOUT_S = 0.2
WINDOW_S = 4.0
# Delays between a probe's start and its record in the upstream's thread
# (connect, scheduling on a loaded machine) are bounded by this, generously.
RECORD_DELAY_S = 1.0
CONNECTIONS = 40

CONFIG = """
[server]
workers = 2
admin = "127.0.0.1:0"
drain_timeout = "2s"
access_log = "off"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
name = "dead"
path_prefix = "/dead"
cluster = "dead"

[[routes]]
name = "api"
path_prefix = "/"
cluster = "api"

[clusters.api]
endpoints = ["{good}", "{flaky}"]

[clusters.api.health_check]
path = "/healthz"
interval = "{interval}s"
timeout = "{timeout}s"
unhealthy_threshold = 2
healthy_threshold = 2

# Down after its first probe, and the next probe is an hour away.
[clusters.dead]
endpoints = [{dead}]

[clusters.dead.health_check]
type = "tcp"
interval = "1h"
timeout = "1s"
unhealthy_threshold = 1
"""


@pytest.fixture
def upstreams(upstream_factory: UpstreamFactory) -> dict[str, Upstream]:
    return {name: upstream_factory(name) for name in ("good", "flaky")}


@pytest.fixture
def second_dead_address() -> Iterator[str]:
    """Another address on 127.0.0.1 that refuses connections (bound, no listen)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def config(upstreams: dict[str, Upstream], *dead: str) -> str:
    return CONFIG.format(
        good=upstreams["good"].address,
        flaky=upstreams["flaky"].address,
        dead=", ".join(f'"{address}"' for address in dead),
        interval=INTERVAL_S,
        timeout=TIMEOUT_S,
    )


@pytest.fixture
def proxy(
    pgproxy_factory: PgproxyFactory,
    upstreams: dict[str, Upstream],
    dead_address: str,
) -> tuple[PgproxyProcess, int]:
    process = pgproxy_factory(config(upstreams, dead_address))
    return process, admin_port(process)


def probes_of(upstream: Upstream) -> int:
    return len(upstream.requests_to("/healthz"))


def traffic_of(upstream: Upstream) -> int:
    return len(upstream.requests) - probes_of(upstream)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def worker_statuses(admin: int, cluster: str, address: str) -> dict[str, str]:
    document = status_json(admin)
    return dict(document["clusters"][cluster][address]["workers"])


def worker_requests(document: dict[str, Any]) -> list[int]:
    return [worker.get("requests", 0) for worker in document["workers"]]


def served_by(port: int, path: str) -> set[str]:
    """Send CONNECTIONS requests, each on a new connection; return the upstreams."""
    served = set()
    for i in range(CONNECTIONS):
        status, _, headers = get(port, f"{path}/{i}")
        assert status == 200
        served.add(headers["x-upstream"])
    return served


def count_lines(process: PgproxyProcess, text: str) -> int:
    return sum(text in line for line in process.stderr_text().splitlines())


def test_one_probe_per_interval_for_all_workers(
    proxy: tuple[PgproxyProcess, int], upstreams: dict[str, Upstream]
) -> None:
    wait_until(
        lambda: all(probes_of(item) >= 1 for item in upstreams.values()),
        "both upstreams were probed",
    )

    started = time.monotonic()
    before = {name: probes_of(item) for name, item in upstreams.items()}
    time.sleep(WINDOW_S)
    after = {name: probes_of(item) for name, item in upstreams.items()}
    elapsed = time.monotonic() - started

    # One prober starts a probe at most every 0.9 x interval (the low end
    # of the jitter), so it cannot exceed this count. Two probers would
    # reach about twice elapsed / (1.1 x interval), well above it.
    limit = (elapsed + RECORD_DELAY_S) / (0.9 * INTERVAL_S) + 1
    counts = {name: after[name] - before[name] for name in upstreams}
    print(f"probes in {elapsed:.2f}s: {counts}; limit {limit:.1f}")
    for name, count in counts.items():
        assert count >= 1, f"{name} was not probed during the window"
        assert count <= limit, f"{name} got {count} probes, limit {limit:.1f}"


def test_failing_endpoint_leaves_both_workers(
    proxy: tuple[PgproxyProcess, int], upstreams: dict[str, Upstream]
) -> None:
    process, admin = proxy
    port = process.port("main")
    flaky = upstreams["flaky"].address
    assert served_by(port, "/before") == {"good", "flaky"}

    upstreams["flaky"].healthz_status = 500
    down_text = f"endpoint {flaky} of cluster api is unhealthy"
    line = process.wait_for_stderr(down_text, timeout=10)
    assert line is not None, process.stderr_text()
    wait_until(
        lambda: (
            worker_statuses(admin, "api", flaky) == {"0": "unhealthy", "1": "unhealthy"}
        ),
        "both workers report the endpoint unhealthy",
    )
    requests_before = worker_requests(status_json(admin))
    traffic_before = traffic_of(upstreams["flaky"])

    served = served_by(port, "/down")

    requests_after = worker_requests(status_json(admin))
    assert served == {"good"}
    assert traffic_of(upstreams["flaky"]) == traffic_before
    # Both workers served some of the new connections with the endpoint down.
    assert all(
        after > before
        for before, after in zip(requests_before, requests_after, strict=True)
    )
    assert "WARNING" in line
    assert "http_status: status 500" in line
    # Both workers have applied the change, so a per-worker line would be there.
    assert count_lines(process, down_text) == 1

    upstreams["flaky"].healthz_status = 200
    up_text = f"endpoint {flaky} of cluster api is healthy again"
    assert process.wait_for_stderr(up_text, timeout=10) is not None
    wait_until(
        lambda: (
            worker_statuses(admin, "api", flaky) == {"0": "healthy", "1": "healthy"}
        ),
        "both workers report the endpoint healthy",
    )
    assert served_by(port, "/after") == {"good", "flaky"}
    assert count_lines(process, up_text) == 1


def test_restarted_worker_starts_with_probe_state(
    proxy: tuple[PgproxyProcess, int], dead_address: str
) -> None:
    process, admin = proxy
    down_text = f"endpoint {dead_address} of cluster dead is unhealthy"
    assert process.wait_for_stderr(down_text, timeout=10) is not None
    wait_until(
        lambda: (
            worker_statuses(admin, "dead", dead_address)
            == {"0": "unhealthy", "1": "unhealthy"}
        ),
        "both workers report the dead endpoint unhealthy",
    )
    victim = status_json(admin)["workers"][0]["pid"]
    start = len(process.stderr_lines)

    os.kill(victim, signal.SIGKILL)

    assert process.wait_for_stderr("restarting", timeout=10, start=start) is not None
    wait_until(
        lambda: all(
            worker["ready"] and worker["pid"] != victim
            for worker in status_json(admin)["workers"]
        ),
        "the replacement worker is ready",
        timeout=15,
    )
    # The next probe is an hour away: only the state sent at start can tell
    # the new worker that the endpoint is down.
    assert worker_statuses(admin, "dead", dead_address) == {
        "0": "unhealthy",
        "1": "unhealthy",
    }
    for i in range(CONNECTIONS):
        assert get(process.port("main"), f"/dead/{i}")[0] == 503
    assert count_lines(process, down_text) == 1


def test_reload_probes_new_graph_once(
    proxy: tuple[PgproxyProcess, int],
    upstreams: dict[str, Upstream],
    dead_address: str,
    second_dead_address: str,
) -> None:
    process, admin = proxy
    kept_text = f"endpoint {dead_address} of cluster dead is unhealthy"
    added_text = f"endpoint {second_dead_address} of cluster dead is unhealthy"
    assert process.wait_for_stderr(kept_text, timeout=10) is not None
    pids = [worker["pid"] for worker in status_json(admin)["workers"]]
    start = len(process.stderr_lines)
    process.config_path.write_text(config(upstreams, dead_address, second_dead_address))

    process.signal(signal.SIGHUP)

    assert process.wait_for_stderr("reloaded", timeout=10, start=start) is not None
    # Only the supervisor's probes of the new graph can find the added
    # endpoint down, because its interval is an hour.
    assert process.wait_for_stderr(added_text, timeout=10, start=start) is not None
    wait_until(
        lambda: (
            worker_statuses(admin, "dead", second_dead_address)
            == {"0": "unhealthy", "1": "unhealthy"}
        ),
        "both workers report the added endpoint unhealthy",
    )
    assert worker_statuses(admin, "dead", dead_address) == {
        "0": "unhealthy",
        "1": "unhealthy",
    }
    assert [worker["pid"] for worker in status_json(admin)["workers"]] == pids
    assert count_lines(process, added_text) == 1
    # The kept endpoint carried its state over, so probing it again after
    # the reload changed nothing to log.
    assert count_lines(process, kept_text) == 1
