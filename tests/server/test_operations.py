"""Tests of a serving process's /metrics while it proxies, over real sockets.

The proxy (`serve` with operations and an admin listener), the upstream and
the clients' sockets are real, on 127.0.0.1 port 0. The clients run in
threads with blocking sockets, so they wait for the event loop like a remote
client would, and never run on it.
"""

from __future__ import annotations

import contextlib
import http.client
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgproxy.graph.load import load_graph
from pgproxy.graph.types import Listener
from pgproxy.observability.exposition import MetricsRenderer
from pgproxy.observability.metrics import Snapshot
from pgproxy.observability.scrape import ServerState
from pgproxy.proxy.service import ProxyService
from pgproxy.server.admin import AdminServer
from pgproxy.server.listeners import BoundListener, bind_listeners
from pgproxy.server.operations import OperationsSettings
from pgproxy.server.runtime import serve
from tests.proxy.loopback import ScriptedUpstream

pytestmark = pytest.mark.anyio

CLUSTERS = 100
CLIENT_TIMEOUT_S = 10.0
HOLD_LIMIT_S = 20.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _status_from_path(head: bytes) -> bytes:
    """Return a response with the status that ends the path (`/r1/404`), or 200."""
    target = head.split(b" ", 2)[1]
    last = target.rsplit(b"/", 1)[-1]
    status = int(last) if last.isdigit() else 200
    return b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\nok" % status


def _config(upstream_port: int) -> str:
    lines = [
        "[server]",
        'admin = "127.0.0.1:0"',
        'access_log = "off"',
        'drain_timeout = "2s"',
        "[listeners.main]",
        'address = "127.0.0.1:0"',
    ]
    for index in range(CLUSTERS):
        lines += ["[[routes]]", f'name = "r{index}"', f'path_prefix = "/r{index}"']
        lines += [f'cluster = "c{index}"']
    for index in range(CLUSTERS):
        lines += [f"[clusters.c{index}]", f'endpoints = ["127.0.0.1:{upstream_port}"]']
    return "\n".join(lines) + "\n"


def _no_reload_bind(listener: Listener) -> BoundListener:
    raise AssertionError("these tests do not reload")


@contextlib.asynccontextmanager
async def _serving(tmp_path: Path) -> AsyncIterator[tuple[int, int]]:
    """Serve a config of CLUSTERS routes with an admin listener.

    Yields the proxy's port and the admin listener's port.
    """
    upstream = ScriptedUpstream(reply=_status_from_path)
    await upstream.start()
    path = tmp_path / "pgproxy.toml"
    path.write_text(_config(upstream.port))
    loaded = load_graph(path)
    admin = AdminServer("127.0.0.1:0")
    admin_port = int(admin.bind().rpartition(":")[2])
    settings = OperationsSettings(
        config_path=str(path),
        loaded=loaded,
        bind=_no_reload_bind,
        admin=admin,
        sighup=False,
    )
    listeners = bind_listeners(loaded.graph)
    stop = anyio.Event()
    ready = anyio.Event()

    def on_ready(_service: ProxyService, _bound: Sequence[BoundListener]) -> None:
        ready.set()

    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: serve(
                loaded.graph,
                shutdown_trigger=stop.wait,
                listeners=listeners,
                on_ready=on_ready,
                operations=settings,
            )
        )
        with anyio.fail_after(10):
            await ready.wait()
        try:
            yield listeners[0].address[1], admin_port
        finally:
            stop.set()
    await upstream.stop()


def _get_all(port: int, paths: Sequence[str]) -> list[tuple[int, bytes]]:
    """Send GET for each path over one keep-alive connection (blocking)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
    replies = []
    try:
        for path in paths:
            connection.request("GET", path)
            response = connection.getresponse()
            replies.append((response.status, response.read()))
    finally:
        connection.close()
    return replies


async def _get(port: int, path: str) -> tuple[int, bytes]:
    replies = await anyio.to_thread.run_sync(_get_all, port, [path])
    return replies[0]


async def _scrape(admin_port: int) -> dict[tuple[str, str], float]:
    """Return pgproxy_requests_total by (route, status) from /metrics."""
    status, body = await _get(admin_port, "/metrics")
    assert status == 200, body
    counts = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "pgproxy_requests_total":
                key = (sample.labels["route"], sample.labels["status"])
                counts[key] = sample.value
    return counts


async def test_proxying_continues_while_metrics_render(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The render is held in its thread until the test releases it. Were it
    # run on the event loop, the requests below would time out.
    entered = threading.Event()
    release = threading.Event()
    original = MetricsRenderer.render

    def held_render(
        self: MetricsRenderer, snapshot: Snapshot, server: ServerState
    ) -> bytes:
        entered.set()
        release.wait(HOLD_LIMIT_S)
        return original(self, snapshot, server)

    monkeypatch.setattr(MetricsRenderer, "render", held_render)
    scraped: list[dict[tuple[str, str], float]] = []
    async with _serving(tmp_path) as (port, admin_port):
        assert (await _get(port, "/r0/a"))[0] == 200

        async def scrape() -> None:
            scraped.append(await _scrape(admin_port))

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(scrape)
                assert await anyio.to_thread.run_sync(entered.wait, HOLD_LIMIT_S)
                during = await anyio.to_thread.run_sync(_get_all, port, ["/r0/b"] * 5)
                release.set()
        finally:
            release.set()
        after = await _scrape(admin_port)

    assert [status for status, _ in during] == [200] * 5
    # The snapshot was taken when the scrape arrived, before those requests.
    assert scraped[0][("r0", "200")] == 1
    assert after[("r0", "200")] == 6


async def test_scrapes_during_proxying_all_succeed(tmp_path: Path) -> None:
    # New status codes add keys to the dicts the loop records into while
    # the rendering thread formats earlier snapshots.
    statuses = ["200", "201", "404", "418", "503"]
    paths = [f"/r{index}/{statuses[index % 5]}" for index in range(CLUSTERS)]
    scrapes: list[dict[tuple[str, str], float]] = []
    replies: list[list[tuple[int, bytes]]] = []

    async def proxy(part: Sequence[str]) -> None:
        replies.append(await anyio.to_thread.run_sync(_get_all, port, part))

    async def scrape_repeatedly() -> None:
        for _ in range(10):
            scrapes.append(await _scrape(admin_port))

    async with _serving(tmp_path) as (port, admin_port):
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(proxy, paths[: CLUSTERS // 2])
                group.start_soon(proxy, paths[CLUSTERS // 2 :])
                group.start_soon(scrape_repeatedly)
                group.start_soon(scrape_repeatedly)
        final = await _scrape(admin_port)

    answered = [status for part in replies for status, _ in part]
    assert len(answered) == CLUSTERS
    assert sorted(answered) == sorted(int(path.rsplit("/", 1)[1]) for path in paths)
    assert len(scrapes) == 20
    assert sum(final.values()) == CLUSTERS
    for index in range(CLUSTERS):
        assert final[(f"r{index}", statuses[index % 5])] == 1
