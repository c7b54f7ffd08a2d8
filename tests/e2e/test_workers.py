"""End-to-end tests of `[server] workers = 2`: spread, restart, drain, metrics."""

from __future__ import annotations

import os
import signal
import time

import pytest
from e2e_admin import admin_port, get, labels, samples, status_json
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import UpstreamFactory

CONFIG = """
[server]
workers = 2
admin = "127.0.0.1:0"
drain_timeout = "5s"
access_log = "off"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
name = "api"
cluster = "{cluster}"

[clusters.api]
endpoints = ["{api}"]

[clusters.other]
endpoints = ["{other}"]
"""

CONNECTIONS = 60


@pytest.fixture
def upstreams(upstream_factory: UpstreamFactory) -> dict[str, str]:
    return {name: upstream_factory(name).address for name in ("api", "other")}


@pytest.fixture
def workers(
    pgproxy_factory: PgproxyFactory, upstreams: dict[str, str]
) -> tuple[PgproxyProcess, int]:
    process = pgproxy_factory(CONFIG.format(cluster="api", **upstreams))
    return process, admin_port(process)


def _live_pids(admin: int) -> list[int]:
    return [worker["pid"] for worker in status_json(admin)["workers"] if worker["pid"]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_both_workers_take_connections(workers: tuple[PgproxyProcess, int]) -> None:
    process, admin = workers
    port = process.port("main")

    for _ in range(CONNECTIONS):
        assert get(port, "/")[0] == 200  # a new connection each time
    per_worker = [
        worker.get("connections", 0) for worker in status_json(admin)["workers"]
    ]

    print(f"connections per worker: {per_worker}")
    assert sum(per_worker) == CONNECTIONS
    # The kernel hashes connections to workers; 60 connections leave each
    # worker at least one with overwhelming probability.
    assert min(per_worker) >= 1


def test_metrics_cover_both_workers(workers: tuple[PgproxyProcess, int]) -> None:
    process, admin = workers
    port = process.port("main")

    for _ in range(CONNECTIONS):
        assert get(port, "/")[0] == 200
    scraped = samples(admin)

    key = labels(listener="main", route="api", cluster="api", status="200")
    assert scraped[("pgproxy_requests_total", key)] == CONNECTIONS
    for worker in ("0", "1"):
        cpu = ("pgproxy_worker_process_cpu_seconds_total", labels(worker=worker))
        assert cpu in scraped
    assert scraped[("pgproxy_workers", ())] == 2


def test_killed_worker_is_restarted(workers: tuple[PgproxyProcess, int]) -> None:
    process, admin = workers
    port = process.port("main")
    victim = _live_pids(admin)[0]
    start = len(process.stderr_lines)

    os.kill(victim, signal.SIGKILL)

    line = process.wait_for_stderr("restarting", timeout=10.0, start=start)
    assert line is not None
    assert "SIGKILL" in line
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        document = status_json(admin)
        if all(worker["ready"] for worker in document["workers"]):
            break
        time.sleep(0.1)
    pids = _live_pids(admin)
    assert len(pids) == 2
    assert victim not in pids
    assert sum(worker["restarts"] for worker in document["workers"]) == 1
    for _ in range(20):
        assert get(port, "/")[0] == 200
    scraped = samples(admin)
    assert scraped[("pgproxy_worker_restarts_total", ())] == 1


def test_sigterm_drains_workers(workers: tuple[PgproxyProcess, int]) -> None:
    process, admin = workers
    pids = _live_pids(admin)
    assert len(pids) == 2

    process.signal(signal.SIGTERM)

    assert process.wait_exit(20) == 0
    assert process.wait_for_stderr("pgproxy stopped", timeout=1.0) is not None
    assert not any(_alive(pid) for pid in pids)


def test_sighup_reloads_every_worker(
    workers: tuple[PgproxyProcess, int], upstreams: dict[str, str]
) -> None:
    process, admin = workers
    port = process.port("main")
    pids = _live_pids(admin)
    start = len(process.stderr_lines)
    process.config_path.write_text(CONFIG.format(cluster="other", **upstreams))

    process.signal(signal.SIGHUP)

    assert process.wait_for_stderr("reloaded", timeout=10.0, start=start) is not None
    served = {get(port, "/")[2]["x-upstream"] for _ in range(CONNECTIONS)}
    assert served == {"other"}  # new connections reach both workers
    lines = process.stderr_lines[start:]
    assert sum("reloaded" in line for line in lines) == 1
    assert status_json(admin)["config"]["last_reload"]["outcome"] == "success"
    # The workers installed the config in place instead of restarting.
    assert _live_pids(admin) == pids
    assert not any("restarting" in line for line in lines)


def test_invalid_reload_logged_once(
    workers: tuple[PgproxyProcess, int], upstreams: dict[str, str]
) -> None:
    process, admin = workers
    start = len(process.stderr_lines)
    before = status_json(admin)["config"]["hash"]
    process.config_path.write_text(CONFIG.format(cluster="missing", **upstreams))

    process.signal(signal.SIGHUP)

    line = process.wait_for_stderr("reload failed", timeout=10.0, start=start)
    assert line is not None
    assert "missing" in line
    time.sleep(0.5)  # a second line from a worker would come quickly
    lines = process.stderr_lines[start:]
    assert sum("reload failed" in text for text in lines) == 1
    assert status_json(admin)["config"]["hash"] == before
    assert get(process.port("main"), "/")[2]["x-upstream"] == "api"


def test_restart_warning_logged_once(
    workers: tuple[PgproxyProcess, int], upstreams: dict[str, str]
) -> None:
    process, _ = workers
    changed = CONFIG.format(cluster="api", **upstreams).replace(
        "workers = 2", "workers = 3"
    )
    start = len(process.stderr_lines)
    process.config_path.write_text(changed)

    process.signal(signal.SIGHUP)

    assert process.wait_for_stderr("reloaded", timeout=10.0, start=start) is not None
    time.sleep(0.5)  # a line from a worker would come quickly
    lines = process.stderr_lines[start:]
    assert sum("restart pgproxy" in line for line in lines) == 1, lines
