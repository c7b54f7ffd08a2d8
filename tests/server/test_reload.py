"""Tests of reload planning and of the reload sequence against a recorded state."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pgproxy.graph.load import LoadedGraph, load_graph
from pgproxy.graph.types import Graph, Listener
from pgproxy.health.state import HealthTable, Status
from pgproxy.server.reload import Reloader, ReloadHistory, ReloadPlan, plan_reload

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


BASE = """
[listeners.public]
address = "127.0.0.1:0"
{extra_listener}

[[routes]]
name = "main"
cluster = "{main_cluster}"

[[routes]]
name = "ws"
path_prefix = "/ws"
cluster = "blue"

[clusters.blue]
endpoints = [{blue}]

[clusters.green]
endpoints = ["127.0.0.1:9101"]
"""


def _write(
    path: Path,
    *,
    main_cluster: str = "blue",
    blue: str = '"127.0.0.1:9001", "127.0.0.1:9002"',
    extra_listener: str = "",
) -> Path:
    path.write_text(
        BASE.format(main_cluster=main_cluster, blue=blue, extra_listener=extra_listener)
    )
    return path


class _State:
    """Records what a reload does to the running state."""

    def __init__(self, loaded: LoadedGraph, clock: list[float]) -> None:
        self.graph: Graph = loaded.graph
        self.health = HealthTable(loaded.graph.clusters, lambda: clock[0])
        self.opened: list[str] = []
        self.installed: list[str] = []
        self.retired: list[ReloadPlan] = []
        self.fail_bind = False

    def check_certificates(self, listeners: tuple[Listener, ...]) -> None:
        pass

    async def open_listeners(self, listeners: tuple[Listener, ...]) -> None:
        if self.fail_bind and listeners:
            raise OSError(98, "Address already in use")
        self.opened.extend(listener.name for listener in listeners)

    def install(
        self, loaded: LoadedGraph, health: HealthTable, plan: ReloadPlan
    ) -> None:
        self.graph = loaded.graph
        self.health = health
        self.installed.append(loaded.config_hash)

    def retire(self, plan: ReloadPlan) -> None:
        self.retired.append(plan)


def _setup(tmp_path: Path) -> tuple[Path, _State, Reloader, list[float]]:
    path = _write(tmp_path / "pgproxy.toml")
    loaded = load_graph(path)
    clock = [100.0]
    state = _State(loaded, clock)
    history = ReloadHistory(str(path), loaded.config_hash)
    return path, state, Reloader(path, state, history), clock


def test_plan_endpoints_and_listeners(tmp_path: Path) -> None:
    old = load_graph(_write(tmp_path / "a.toml")).graph
    new = load_graph(
        _write(
            tmp_path / "b.toml",
            blue='"127.0.0.1:9002", "127.0.0.1:9003"',
            extra_listener='[listeners.admin2]\naddress = "127.0.0.1:0"',
        )
    ).graph

    plan = plan_reload(old, new)

    assert [listener.name for listener in plan.added_listeners] == ["admin2"]
    assert plan.removed_listeners == ()
    assert plan.kept_listeners == ("public",)
    assert plan.added_endpoints == {("blue", "127.0.0.1:9003")}
    assert plan.removed_endpoints == {("blue", "127.0.0.1:9001")}
    assert ("blue", "127.0.0.1:9002") in plan.kept_endpoints


def test_plan_changed_address_replaces_listener(tmp_path: Path) -> None:
    old = load_graph(_write(tmp_path / "a.toml")).graph
    text = (tmp_path / "a.toml").read_text().replace("127.0.0.1:0", "127.0.0.2:0", 1)
    (tmp_path / "b.toml").write_text(text)
    new = load_graph(tmp_path / "b.toml").graph

    plan = plan_reload(old, new)

    assert [listener.name for listener in plan.added_listeners] == ["public"]
    assert plan.removed_listeners == ("public",)


def test_plan_tunnel_survival(tmp_path: Path) -> None:
    old = load_graph(_write(tmp_path / "a.toml")).graph
    new = load_graph(
        _write(tmp_path / "b.toml", main_cluster="green", blue='"127.0.0.1:9002"')
    ).graph

    plan = plan_reload(old, new)

    assert plan.tunnel_survives("ws", "blue", "127.0.0.1:9002")
    assert not plan.tunnel_survives("ws", "blue", "127.0.0.1:9001")  # removed
    assert not plan.tunnel_survives("main", "blue", "127.0.0.1:9002")  # re-routed


async def test_reload_swaps_and_records(tmp_path: Path) -> None:
    path, state, reloader, _ = _setup(tmp_path)
    _write(path, main_cluster="green")

    outcome = await reloader.reload()

    assert outcome.ok
    assert state.installed == [outcome.config_hash]
    routes = {route.name: route.cluster for route in state.graph.routes}
    assert routes == {"main": "green", "ws": "blue"}
    assert len(state.retired) == 1
    assert reloader.history.config_hash == outcome.config_hash
    assert reloader.history.counts == {"success": 1}


async def test_reload_carries_health_over(tmp_path: Path) -> None:
    path, state, reloader, _ = _setup(tmp_path)
    down = state.graph.clusters["blue"].endpoints[1]  # 127.0.0.1:9002
    state.health.record_probe(down, False, "refused")
    state.health.record_probe(down, False, "refused")
    state.health.record_probe(down, False, "refused")
    _write(path, blue='"127.0.0.1:9002", "127.0.0.1:9003"')

    await reloader.reload()

    snapshot = state.health.snapshot()["blue"]
    assert snapshot["127.0.0.1:9002"]["status"] == Status.UNHEALTHY.value
    assert snapshot["127.0.0.1:9003"]["status"] == Status.HEALTHY.value
    assert "127.0.0.1:9001" not in snapshot


async def test_invalid_config_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, state, reloader, _ = _setup(tmp_path)
    before = state.graph
    path.write_text(
        path.read_text()
        + '\n[clusters.bad]\nendpoints = ["not-an-address"]\nconnect_timeout = 5\n'
    )

    with caplog.at_level(logging.INFO, logger="pgproxy.server.reload"):
        outcome = await reloader.reload()

    assert not outcome.ok
    assert state.graph is before
    assert state.installed == []
    assert reloader.history.counts == {"failure": 1}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    line = errors[0].getMessage()
    assert "keeping the running config" in line
    assert "2 problems" in line
    assert "connect_timeout" in line
    assert "not-an-address" in line
    assert "\n" not in line


async def test_bind_failure_changes_nothing(tmp_path: Path) -> None:
    path, state, reloader, _ = _setup(tmp_path)
    before = state.graph
    state.fail_bind = True
    _write(path, extra_listener='[listeners.more]\naddress = "127.0.0.1:0"')

    outcome = await reloader.reload()

    assert not outcome.ok
    assert outcome.error is not None
    assert '"more"' in outcome.error
    assert state.graph is before
    assert state.installed == []


async def test_restart_required_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, _, reloader, _ = _setup(tmp_path)
    path.write_text("[server]\nworkers = 3\n" + path.read_text())

    with caplog.at_level(logging.WARNING, logger="pgproxy.server.reload"):
        outcome = await reloader.reload()

    assert outcome.ok
    assert any("[server] workers" in r.getMessage() for r in caplog.records)


async def test_restart_warning_compares_running_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A reload cannot change `workers`, so each reload compares the file with
    # the value the process started with, not with the last reload's.
    path, _, reloader, _ = _setup(tmp_path)
    started = path.read_text()
    path.write_text("[server]\nworkers = 3\n" + started)
    with caplog.at_level(logging.WARNING, logger="pgproxy.server.reload"):
        assert (await reloader.reload()).ok
        caplog.clear()
        assert (await reloader.reload()).ok
        still_changed = [r.getMessage() for r in caplog.records]
        caplog.clear()
        path.write_text(started)
        assert (await reloader.reload()).ok
        reverted = [r.getMessage() for r in caplog.records]

    assert any("[server] workers" in message for message in still_changed)
    assert not any("restart pgproxy" in message for message in reverted), reverted
