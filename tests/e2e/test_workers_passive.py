"""End-to-end tests of passive health (outlier detection) with `workers = 2`.

The supervisor counts the failures of every worker's traffic, so an endpoint
is ejected after `consecutive_failures` in a row spread over both workers,
for both workers, with one log line, and returns for both after the
ejection time. Each test opens one keep-alive connection on each worker,
found through the per-worker connection counts of /status, so it can send
failures through both workers in turn.
"""

from __future__ import annotations

import http.client
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from e2e_admin import admin_port, get, labels, samples, status_json
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory, echo, fixed

CONFIG = """
[server]
workers = 2
admin = "127.0.0.1:0"
drain_timeout = "2s"
access_log = "off"

[listeners.main]
address = "127.0.0.1:0"
{extra_route}
[[routes]]
name = "api"
path_prefix = "/"
cluster = "api"

[clusters.api]
endpoints = ["{good}", "{bad}"]

[clusters.api.outlier_detection]
consecutive_failures = {failures}
base_ejection_time = "{ejection}"
max_ejection_percent = 50
"""

EXTRA_ROUTE = """
[[routes]]
name = "hello"
path = "/hello"
respond = { status = 200, body = "hi" }
"""

# Connections opened at most to find one on each worker: the kernel spreads
# them by a hash, so 40 all on one worker has a chance of 2**-39.
MAX_PROBING_CONNECTIONS = 40
REQUESTS = 20


@dataclass
class WorkerConnection:
    """A keep-alive client connection that one worker process serves."""

    worker: int
    conn: http.client.HTTPConnection
    failures: int = 0
    upstreams: list[str] = field(default_factory=list)

    def send(self, path: str) -> tuple[int, str]:
        """Send one GET; return the status and the upstream that responded."""
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        response.read()
        upstream = response.getheader("x-upstream") or ""
        self.upstreams.append(upstream)
        return response.status, upstream


@pytest.fixture
def upstreams(upstream_factory: UpstreamFactory) -> dict[str, Upstream]:
    return {name: upstream_factory(name) for name in ("good", "bad")}


def config(
    upstreams: dict[str, Upstream], failures: int, ejection: str, extra: str = ""
) -> str:
    return CONFIG.format(
        good=upstreams["good"].address,
        bad=upstreams["bad"].address,
        failures=failures,
        ejection=ejection,
        extra_route=extra,
    )


def wait_until(
    condition: Callable[[], bool], description: str, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {description}"
        time.sleep(0.05)


def opened_per_worker(admin: int) -> list[int]:
    return [worker.get("connections", 0) for worker in status_json(admin)["workers"]]


def endpoint_status(admin: int, address: str) -> dict[str, object]:
    result: dict[str, object] = status_json(admin)["clusters"]["api"][address]
    return result


def worker_statuses(admin: int, address: str) -> object:
    return endpoint_status(admin, address)["workers"]


@pytest.fixture
def connections() -> Iterator[list[WorkerConnection]]:
    opened: list[WorkerConnection] = []
    yield opened
    for item in opened:
        item.conn.close()


def connect_to_each_worker(
    port: int, admin: int, opened: list[WorkerConnection]
) -> list[WorkerConnection]:
    """Return one keep-alive connection per worker, found by trying new ones."""
    by_worker: dict[int, WorkerConnection] = {}
    for _ in range(MAX_PROBING_CONNECTIONS):
        before = opened_per_worker(admin)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        item = WorkerConnection(-1, conn)
        opened.append(item)
        assert item.send("/which-worker")[0] == 200
        after = opened_per_worker(admin)
        grown = zip(before, after, strict=True)
        [worker] = [index for index, (old, new) in enumerate(grown) if new > old]
        item.worker = worker
        by_worker.setdefault(worker, item)
        if len(by_worker) == 2:
            return [by_worker[0], by_worker[1]]
    raise AssertionError("every connection went to the same worker")


def send_failures(
    pair: list[WorkerConnection], count: int, path: str = "/fail"
) -> float:
    """Send requests until `count` more failed, spreading failures evenly.

    Each request goes through the worker with fewer failures so far, so
    neither worker alone gets more than half of them, rounded up. Returns
    the monotonic time just before the request of the last failure.
    """
    failed = 0
    for turn in range(8 * count):
        item = min(pair, key=lambda candidate: candidate.failures)
        sent_at = time.monotonic()
        status, upstream = item.send(f"{path}/{turn}")
        if upstream == "bad":
            assert status == 503
            item.failures += 1
            failed += 1
            if failed == count:
                return sent_at
        else:
            assert status == 200
    raise AssertionError(f"only {failed} of {count} requests reached the endpoint")


def start_and_connect(
    pgproxy_factory: PgproxyFactory,
    upstreams: dict[str, Upstream],
    opened: list[WorkerConnection],
    failures: int,
    ejection: str,
) -> tuple[PgproxyProcess, int, list[WorkerConnection]]:
    process = pgproxy_factory(config(upstreams, failures, ejection))
    admin = admin_port(process)
    pair = connect_to_each_worker(process.port("main"), admin, opened)
    upstreams["bad"].handler = fixed(503, b"unavailable\n")
    return process, admin, pair


def eject_through_both_workers(
    process: PgproxyProcess,
    admin: int,
    pair: list[WorkerConnection],
    bad: str,
    failures: int,
) -> float:
    """Fail `failures` requests in a row over both workers; wait for the ejection.

    Returns the time just before the request of the last failure.
    """
    send_failures(pair, failures - 1)
    # One short of the threshold: counted across both workers, not ejected.
    wait_until(
        lambda: endpoint_status(admin, bad)["consecutive_failures"] == failures - 1,
        "the supervisor counts the failures of both workers",
    )
    assert worker_statuses(admin, bad) == {"0": "healthy", "1": "healthy"}
    last_sent = send_failures(pair, 1)
    assert all(0 < item.failures < failures for item in pair), [
        item.failures for item in pair
    ]
    text = f"endpoint {bad} of cluster api is ejected"
    assert process.wait_for_stderr(text, timeout=10) is not None
    wait_until(
        lambda: worker_statuses(admin, bad) == {"0": "ejected", "1": "ejected"},
        "both workers report the endpoint ejected",
    )
    return last_sent


def count_lines(process: PgproxyProcess, text: str) -> int:
    return sum(text in line for line in process.stderr_text().splitlines())


def served_only_by_good(port: int, pair: list[WorkerConnection], bad: Upstream) -> None:
    """Check that requests on `pair` and on new connections reach only good."""
    before = len(bad.requests)
    for item in pair:
        for i in range(REQUESTS):
            assert item.send(f"/after/{i}") == (200, "good")
    for i in range(REQUESTS):
        status, _, headers = get(port, f"/new/{i}")
        assert (status, headers["x-upstream"]) == (200, "good")
    assert len(bad.requests) == before


def test_failures_across_workers_eject_for_both(
    pgproxy_factory: PgproxyFactory,
    upstreams: dict[str, Upstream],
    connections: list[WorkerConnection],
) -> None:
    process, admin, pair = start_and_connect(
        pgproxy_factory, upstreams, connections, failures=4, ejection="1m"
    )
    bad = upstreams["bad"].address

    eject_through_both_workers(process, admin, pair, bad, failures=4)

    served_only_by_good(process.port("main"), pair, upstreams["bad"])
    lines = [
        line
        for line in process.stderr_text().splitlines()
        if f"endpoint {bad} of cluster api" in line
    ]
    assert len(lines) == 1, lines
    assert lines[0].startswith("WARNING")
    assert "is ejected: 4 failures in a row, last: HTTP 503" in lines[0]
    state = endpoint_status(admin, bad)
    assert (state["consecutive_failures"], state["ejections"]) == (0, 1)
    scraped = samples(admin)
    key = labels(cluster="api", endpoint=bad)
    assert scraped[("pgproxy_endpoint_ejections_total", key)] == 1
    assert scraped[("pgproxy_endpoint_healthy", key)] == 0.0


def test_ejection_ends_for_both_workers(
    pgproxy_factory: PgproxyFactory,
    upstreams: dict[str, Upstream],
    connections: list[WorkerConnection],
) -> None:
    process, admin, pair = start_and_connect(
        pgproxy_factory, upstreams, connections, failures=2, ejection="1s"
    )
    bad = upstreams["bad"].address
    last_sent = eject_through_both_workers(process, admin, pair, bad, failures=2)
    upstreams["bad"].handler = echo

    returned = f"endpoint {bad} of cluster api is healthy again"
    line = process.wait_for_stderr(returned, timeout=15)
    returned_seen = time.monotonic()

    assert line is not None, process.stderr_text()
    assert line.startswith("INFO")
    assert "ejection time is over" in line
    # The ejection started after the last failure was sent, and lasts 1s.
    assert returned_seen - last_sent >= 1.0
    wait_until(
        lambda: worker_statuses(admin, bad) == {"0": "healthy", "1": "healthy"},
        "both workers report the endpoint healthy",
    )
    for item in pair:
        # Round robin over two endpoints reaches each within two requests.
        served = {item.send(f"/back/{i}")[1] for i in range(4)}
        assert served == {"good", "bad"}, item.worker
    assert count_lines(process, returned) == 1
    assert count_lines(process, f"endpoint {bad} of cluster api is ejected") == 1


def test_restarted_worker_starts_ejected(
    pgproxy_factory: PgproxyFactory,
    upstreams: dict[str, Upstream],
    connections: list[WorkerConnection],
) -> None:
    process, admin, pair = start_and_connect(
        pgproxy_factory, upstreams, connections, failures=2, ejection="1m"
    )
    bad = upstreams["bad"].address
    eject_through_both_workers(process, admin, pair, bad, failures=2)
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
    # No failure reaches the new worker: only its start message can eject it there.
    assert worker_statuses(admin, bad) == {"0": "ejected", "1": "ejected"}
    served_only_by_good(process.port("main"), [pair[1]], upstreams["bad"])
    assert count_lines(process, f"endpoint {bad} of cluster api is ejected") == 1


def test_reload_keeps_ejection(
    pgproxy_factory: PgproxyFactory,
    upstreams: dict[str, Upstream],
    connections: list[WorkerConnection],
) -> None:
    process, admin, pair = start_and_connect(
        pgproxy_factory, upstreams, connections, failures=2, ejection="1m"
    )
    bad = upstreams["bad"].address
    eject_through_both_workers(process, admin, pair, bad, failures=2)
    pids = [worker["pid"] for worker in status_json(admin)["workers"]]
    start = len(process.stderr_lines)
    process.config_path.write_text(config(upstreams, 2, "1m", EXTRA_ROUTE))

    process.signal(signal.SIGHUP)

    assert process.wait_for_stderr("reloaded", timeout=10, start=start) is not None
    assert get(process.port("main"), "/hello")[:2] == (200, b"hi")
    assert [worker["pid"] for worker in status_json(admin)["workers"]] == pids
    assert worker_statuses(admin, bad) == {"0": "ejected", "1": "ejected"}
    assert endpoint_status(admin, bad)["ejections"] == 1
    served_only_by_good(process.port("main"), pair, upstreams["bad"])
