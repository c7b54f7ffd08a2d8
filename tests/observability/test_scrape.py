"""Tests of /metrics formatting in a worker thread."""

from __future__ import annotations

import sys
import threading

import anyio
import pytest

from pgproxy.observability.exposition import MetricsRenderer
from pgproxy.observability.metrics import EndpointReading, Metrics, Snapshot
from pgproxy.observability.scrape import (
    RENDER_SWITCH_INTERVAL_S,
    ServerState,
    ThreadedRenderer,
)

pytestmark = pytest.mark.anyio

# Families of prometheus-client's own collectors, whose values change between
# two renders of the same state.
_VARYING_PREFIXES = ("process_", "python_gc_")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _metrics() -> Metrics:
    metrics = Metrics()
    for index in range(20):
        stats = metrics.request_stats("public", f"route{index}", f"c{index}")
        stats.observe(200, 0.004)
        stats.observe(503, 0.3, attempts=2)
    metrics.connection_stats("public").connection_opened()
    metrics.record_upstream_failure("c1", "127.0.0.1:9", "connect_failure")
    metrics.record_ejection("c1", "127.0.0.1:9")
    readings = [
        EndpointReading(f"c{index}", f"127.0.0.1:{port}", 1.0, 2, 1)
        for index in range(20)
        for port in (1, 2, 3)
    ]
    metrics.set_endpoint_source(lambda: readings)
    return metrics


def _stable_lines(text: bytes) -> list[str]:
    lines = []
    for line in text.decode().splitlines():
        name = line.removeprefix("# HELP ").removeprefix("# TYPE ")
        if not name.startswith(_VARYING_PREFIXES):
            lines.append(line)
    return lines


def _server() -> ServerState:
    return ServerState(
        config_hash="abc123", reloads={"success": 2, "failure": 1}, workers=1
    )


async def test_threaded_text_matches_direct_render() -> None:
    snapshot = _metrics().snapshot()

    direct = MetricsRenderer().render(snapshot, _server())
    threaded = await ThreadedRenderer().render(snapshot, _server())

    stable = _stable_lines(threaded)
    assert stable == _stable_lines(direct)
    assert sum(line.startswith("pgproxy_requests_total{") for line in stable) == 40
    assert sum(line.startswith("pgproxy_endpoint_healthy{") for line in stable) == 60
    assert any(
        line.startswith("process_cpu_seconds_total")
        for line in threaded.decode().splitlines()
    )


async def test_render_runs_in_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    original = MetricsRenderer.render

    def record_thread(
        self: MetricsRenderer, snapshot: Snapshot, server: ServerState
    ) -> bytes:
        threads.append(threading.get_ident())
        return original(self, snapshot, server)

    monkeypatch.setattr(MetricsRenderer, "render", record_thread)

    await ThreadedRenderer().render(Snapshot(), ServerState())

    assert len(threads) == 1
    assert threads[0] != threading.get_ident()


async def test_switch_interval_short_while_rendering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    intervals: list[float] = []
    original = MetricsRenderer.render

    def record_interval(
        self: MetricsRenderer, snapshot: Snapshot, server: ServerState
    ) -> bytes:
        intervals.append(sys.getswitchinterval())
        return original(self, snapshot, server)

    monkeypatch.setattr(MetricsRenderer, "render", record_interval)
    before = sys.getswitchinterval()

    await ThreadedRenderer().render(Snapshot(), ServerState())

    assert intervals == [RENDER_SWITCH_INTERVAL_S]
    assert sys.getswitchinterval() == before


async def test_concurrent_renders_run_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lock = threading.Lock()
    active = [0]
    peak = [0]
    original = MetricsRenderer.render

    def count_active(
        self: MetricsRenderer, snapshot: Snapshot, server: ServerState
    ) -> bytes:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return original(self, snapshot, server)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(MetricsRenderer, "render", count_active)
    renderer = ThreadedRenderer()
    snapshot = _metrics().snapshot()
    texts: list[bytes] = []

    async def render() -> None:
        texts.append(await renderer.render(snapshot, _server()))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(render)

    assert len(texts) == 8
    assert peak[0] == 1
    assert len({tuple(_stable_lines(text)) for text in texts}) == 1
