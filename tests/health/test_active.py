"""Tests of active probes and the probe loop against real loopback servers."""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import trustme

import pgproxy.health.active as active
from pgproxy.config.models import (
    ClusterConfig,
    Config,
    HealthCheckConfig,
    OutlierDetectionConfig,
    split_endpoint_address,
)
from pgproxy.graph.settings import ClusterSettings, ServerSettings, settings_from_config
from pgproxy.graph.types import Cluster, Endpoint, Graph
from pgproxy.health.active import (
    ProbeResult,
    Stage,
    jittered,
    probe_endpoint,
    probe_host_header,
    run_active_checks,
)
from pgproxy.health.state import HealthTable
from tests.health.servers import (
    ServerFarm,
    refused_port,
    server_farm,
    unaccepting_listener,
)

pytestmark = pytest.mark.anyio

HTTP_CHECK = HealthCheckConfig(path="/healthz", timeout="500ms")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def farm() -> Iterator[ServerFarm]:
    with server_farm() as farm:
        yield farm


def endpoint(address: str, cluster: str = "api") -> Endpoint:
    tls, host, port = split_endpoint_address(address)
    return Endpoint(address, host, port, tls, 1, cluster)


def make_graph(clusters: dict[str, ClusterConfig]) -> Graph:
    config = Config(listeners={}, clusters=clusters)
    built = {
        name: Cluster(
            name,
            tuple(endpoint(ep.address, name) for ep in cluster.endpoint_configs()),
            settings_from_config(ClusterSettings, cluster),
        )
        for name, cluster in clusters.items()
    }
    server = settings_from_config(ServerSettings, config.server)
    return Graph(server, "test.toml", {}, built, (), router=None)  # type: ignore[arg-type]


async def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> float:
    """Poll `condition` until it holds; return the seconds it took."""
    started = time.monotonic()
    with anyio.fail_after(limit):
        # Servers in another thread change the state, so there is no event.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.02)
    return time.monotonic() - started


# probe_endpoint: one stage per failure.


async def test_http_probe_ok(farm: ServerFarm) -> None:
    server = farm.add("ok")
    result = await probe_endpoint(endpoint(server.address), HTTP_CHECK, 2.0)
    assert result.ok
    assert result.stage is Stage.OK
    assert result.status == 200
    assert 0 <= result.latency_s < 2.0
    assert server.requests["/healthz"] == 1
    assert server.host_headers == [server.address]


async def test_http_probe_sends_configured_host(farm: ServerFarm) -> None:
    server = farm.add("ok")
    check = HealthCheckConfig(path="/ready", host="api.example.com", method="HEAD")
    result = await probe_endpoint(endpoint(server.address), check, 2.0)
    assert result.ok
    assert server.requests["/ready"] == 1
    assert server.host_headers == ["api.example.com"]


async def test_http_probe_wrong_status(farm: ServerFarm) -> None:
    server = farm.add("status:503")
    result = await probe_endpoint(endpoint(server.address), HTTP_CHECK, 2.0)
    assert not result.ok
    assert result.stage is Stage.HTTP_STATUS
    assert result.status == 503
    assert result.detail == "status 503, expected 200-399"


async def test_http_probe_status_list(farm: ServerFarm) -> None:
    server = farm.add("status:204")
    check = HealthCheckConfig(expect_status="200,204")
    result = await probe_endpoint(endpoint(server.address), check, 2.0)
    assert result.ok
    assert result.status == 204
    server.mode = "status:201"
    result = await probe_endpoint(endpoint(server.address), check, 2.0)
    assert result.stage is Stage.HTTP_STATUS


@pytest.mark.parametrize("status", [600, 999])
async def test_http_probe_status_outside_range(farm: ServerFarm, status: int) -> None:
    server = farm.add(f"status:{status}")
    check = HealthCheckConfig(expect_status="100-599")
    result = await probe_endpoint(endpoint(server.address), check, 2.0)
    assert not result.ok
    assert result.stage is Stage.HTTP_STATUS
    assert result.status == status
    assert result.detail == f"status {status} is outside 100-599"


async def test_http_probe_status_599_in_range(farm: ServerFarm) -> None:
    server = farm.add("status:599")
    check = HealthCheckConfig(expect_status="100-599")
    result = await probe_endpoint(endpoint(server.address), check, 2.0)
    assert result.ok
    assert result.status == 599


async def test_probe_refused() -> None:
    result = await probe_endpoint(
        endpoint(f"127.0.0.1:{refused_port()}"), HTTP_CHECK, 2.0
    )
    assert not result.ok
    assert result.stage is Stage.TCP_REFUSED
    assert result.status is None
    assert "refused" in result.detail.lower()


async def test_http_probe_hanging_server_times_out(farm: ServerFarm) -> None:
    server = farm.add("hang")
    result = await probe_endpoint(endpoint(server.address), HTTP_CHECK, 0.3)
    assert not result.ok
    assert result.stage is Stage.HTTP_TIMEOUT
    assert result.detail == "http step timed out after 0.3s"
    assert 0.3 <= result.latency_s < 2.0


async def test_http_probe_garbage_is_protocol_error(farm: ServerFarm) -> None:
    server = farm.add("garbage")
    result = await probe_endpoint(endpoint(server.address), HTTP_CHECK, 2.0)
    assert not result.ok
    assert result.stage is Stage.PROTOCOL_ERROR
    assert result.status is None


async def test_probe_connect_timeout() -> None:
    with unaccepting_listener() as port:
        result = await probe_endpoint(endpoint(f"127.0.0.1:{port}"), HTTP_CHECK, 0.3)
    assert not result.ok
    assert result.stage is Stage.TCP_TIMEOUT


async def test_probe_unresolvable_name() -> None:
    result = await probe_endpoint(endpoint("upstream.invalid:80"), HTTP_CHECK, 5.0)
    assert not result.ok
    assert result.stage is Stage.DNS


async def test_tcp_check_only_connects(farm: ServerFarm) -> None:
    server = farm.add("hang")
    check = HealthCheckConfig(type="tcp")
    result = await probe_endpoint(endpoint(server.address), check, 1.0)
    assert result.ok
    assert result.stage is Stage.OK
    assert result.status is None
    await wait_until(lambda: server.connections == 1)
    assert sum(server.requests.values()) == 0


async def test_probe_without_check_is_tcp(farm: ServerFarm) -> None:
    server = farm.add("garbage")
    result = await probe_endpoint(endpoint(server.address), None, 1.0)
    assert result.ok
    refused = await probe_endpoint(endpoint(f"127.0.0.1:{refused_port()}"), None, 1.0)
    assert refused.stage is Stage.TCP_REFUSED


async def test_probe_endpoint_by_name(farm: ServerFarm) -> None:
    server = farm.add("ok")
    result = await probe_endpoint(endpoint(f"localhost:{server.port}"), HTTP_CHECK, 2.0)
    assert result.ok
    assert server.host_headers == [f"localhost:{server.port}"]


def test_probe_host_header_brackets_ipv6() -> None:
    check = HealthCheckConfig()
    assert probe_host_header(endpoint("[::1]:8080"), check) == "[::1]:8080"


# TLS endpoints.


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, name: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_https_probe_trusted_certificate(
    farm: ServerFarm, ca: trustme.CA
) -> None:
    server = farm.add("ok", tls=server_context(ca, "127.0.0.1"))
    result = await probe_endpoint(
        endpoint(f"https://{server.address}"),
        HTTP_CHECK,
        2.0,
        ssl_context=client_context(ca),
    )
    assert result.ok, result.detail
    assert result.status == 200


async def test_https_probe_untrusted_certificate(
    farm: ServerFarm, ca: trustme.CA
) -> None:
    server = farm.add("ok", tls=server_context(ca, "127.0.0.1"))
    result = await probe_endpoint(
        endpoint(f"https://{server.address}"), HTTP_CHECK, 2.0
    )
    assert not result.ok
    assert result.stage is Stage.TLS
    assert "certificate" in result.detail
    assert sum(server.requests.values()) == 0


async def test_https_probe_hostname_mismatch(farm: ServerFarm, ca: trustme.CA) -> None:
    server = farm.add("ok", tls=server_context(ca, "other.example"))
    result = await probe_endpoint(
        endpoint(f"https://{server.address}"),
        HTTP_CHECK,
        2.0,
        ssl_context=client_context(ca),
    )
    assert not result.ok
    assert result.stage is Stage.TLS
    assert "mismatch" in result.detail or "match" in result.detail


async def test_https_probe_to_plain_server(farm: ServerFarm) -> None:
    server = farm.add("garbage")
    result = await probe_endpoint(
        endpoint(f"https://{server.address}"), HTTP_CHECK, 2.0
    )
    assert result.stage is Stage.TLS


# The probe loop.


def check_config(**overrides: object) -> HealthCheckConfig:
    values: dict[str, object] = {
        "path": "/healthz",
        "interval": "200ms",
        "timeout": "150ms",
        "healthy_threshold": 2,
        "unhealthy_threshold": 2,
    }
    values.update(overrides)
    return HealthCheckConfig.model_validate(values)


def test_jitter_spreads_intervals() -> None:
    rng = random.Random(7)
    waits = [jittered(10.0, rng) for _ in range(200)]
    assert min(waits) >= 9.0
    assert max(waits) <= 11.0
    assert max(waits) - min(waits) > 1.0
    assert len(set(waits)) == 200


async def test_loop_marks_down_and_up(
    farm: ServerFarm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgproxy.health")
    good, bad = farm.add("ok"), farm.add("status:500")
    gone = f"127.0.0.1:{refused_port()}"
    cluster = ClusterConfig(
        endpoints=[good.address, bad.address, gone], health_check=check_config()
    )
    graph = make_graph({"api": cluster})
    table = HealthTable(graph.clusters, time.monotonic)
    good_ep, bad_ep, gone_ep = graph.clusters["api"].endpoints
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: run_active_checks(graph, table, stop=stop))
        await wait_until(lambda: not table.is_available(bad_ep))
        await wait_until(lambda: not table.is_available(gone_ep))
        assert table.is_available(good_ep)
        # The loops keep probing after failures.
        probes_before = bad.requests["/healthz"]
        await wait_until(lambda: bad.requests["/healthz"] >= probes_before + 3)
        bad.mode = "ok"
        await wait_until(lambda: table.is_available(bad_ep))
        stop.set()
    assert not table.is_available(gone_ep)

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any(bad.address in r.getMessage() for r in warnings)
    assert any("http_status: status 500" in r.getMessage() for r in warnings)
    assert any("tcp_refused" in r.getMessage() for r in warnings)
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert [bad.address in r.getMessage() for r in infos] == [True]


async def test_first_round_at_startup(farm: ServerFarm) -> None:
    servers = [farm.add("ok") for _ in range(5)]
    cluster = ClusterConfig(
        endpoints=[s.address for s in servers],
        health_check=check_config(interval="1h", timeout="1s"),
    )
    graph = make_graph({"api": cluster})
    table = HealthTable(graph.clusters, time.monotonic)
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: run_active_checks(graph, table, stop=stop))
        await wait_until(lambda: all(s.requests["/healthz"] == 1 for s in servers))
        stop.set()


async def test_hanging_endpoint_does_not_delay_others(farm: ServerFarm) -> None:
    hanging, good = farm.add("hang"), farm.add("ok")
    cluster = ClusterConfig(
        endpoints=[hanging.address, good.address],
        health_check=check_config(interval="300ms", timeout="250ms"),
    )
    graph = make_graph({"api": cluster})
    table = HealthTable(graph.clusters, time.monotonic)
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: run_active_checks(graph, table, stop=stop))
        await wait_until(lambda: good.requests["/healthz"] >= 4)
        await wait_until(
            lambda: not table.is_available(graph.clusters["api"].endpoints[0])
        )
        stop.set()
    assert table.is_available(graph.clusters["api"].endpoints[1])


async def test_loop_survives_probe_crash(
    farm: ServerFarm,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = farm.add("ok")
    calls = 0
    real_probe = active.probe_endpoint

    async def flaky_probe(*args: object, **kwargs: object) -> ProbeResult:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("bug in the probe")
        return await real_probe(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(active, "probe_endpoint", flaky_probe)
    cluster = ClusterConfig(
        endpoints=[server.address],
        health_check=check_config(interval="100ms", timeout="90ms"),
    )
    graph = make_graph({"api": cluster})
    table = HealthTable(graph.clusters, time.monotonic)
    ep = graph.clusters["api"].endpoints[0]
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: run_active_checks(graph, table, stop=stop))
        await wait_until(lambda: calls >= 2 and not table.is_available(ep))
        await wait_until(lambda: table.is_available(ep))
        stop.set()
    crashes = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(crashes) == 2
    assert crashes[0].exc_info is not None
    assert server.requests["/healthz"] >= 2


async def test_sweeper_logs_passive_ejections(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgproxy.health")
    cluster = ClusterConfig(
        endpoints=["127.0.0.1:1", "127.0.0.1:2"],
        outlier_detection=OutlierDetectionConfig(
            consecutive_failures=2, base_ejection_time="300ms"
        ),
    )
    graph = make_graph({"api": cluster})
    table = HealthTable(graph.clusters, time.monotonic)
    ep = graph.clusters["api"].endpoints[0]
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: run_active_checks(graph, table, stop=stop))
        table.record_failure(ep, "connect failed: connection refused")
        table.record_failure(ep, "connect failed: connection refused")
        assert not table.is_available(ep)
        await wait_until(lambda: any(r.levelno == logging.INFO for r in caplog.records))
        stop.set()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert len(messages) == 2
    assert messages[0][0] == logging.WARNING
    assert "127.0.0.1:1 of cluster api is ejected" in messages[0][1]
    assert "connection refused" in messages[0][1]
    assert messages[1][0] == logging.INFO
    assert "ejection time is over" in messages[1][1]


async def test_run_active_checks_stops_on_event() -> None:
    graph = make_graph({})
    table = HealthTable(graph.clusters, time.monotonic)
    stop = anyio.Event()
    stop.set()
    with anyio.fail_after(5):
        await run_active_checks(graph, table, stop=stop)


# The cluster's tls_ca_file.


async def test_https_probe_with_ca_file(
    farm: ServerFarm, ca: trustme.CA, tmp_path: Path
) -> None:
    server = farm.add("ok", tls=server_context(ca, "127.0.0.1"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    result = await probe_endpoint(
        endpoint(f"https://{server.address}"), HTTP_CHECK, 2.0, ca_file=str(ca_file)
    )
    assert result.ok, result.detail
    assert result.status == 200


async def test_https_probe_with_other_ca_file(
    farm: ServerFarm, ca: trustme.CA, tmp_path: Path
) -> None:
    server = farm.add("ok", tls=server_context(ca, "127.0.0.1"))
    ca_file = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    result = await probe_endpoint(
        endpoint(f"https://{server.address}"), HTTP_CHECK, 2.0, ca_file=str(ca_file)
    )
    assert not result.ok
    assert result.stage is Stage.TLS
    assert "certificate" in result.detail
    assert sum(server.requests.values()) == 0


async def test_https_probe_with_missing_ca_file(
    farm: ServerFarm, ca: trustme.CA, tmp_path: Path
) -> None:
    server = farm.add("ok", tls=server_context(ca, "127.0.0.1"))
    missing = tmp_path / "missing.pem"
    result = await probe_endpoint(
        endpoint(f"https://{server.address}"), HTTP_CHECK, 2.0, ca_file=str(missing)
    )
    assert result.stage is Stage.TLS
    assert f'cannot load tls_ca_file "{missing}"' in result.detail


async def test_loop_verifies_with_cluster_ca_file(
    farm: ServerFarm, ca: trustme.CA, tmp_path: Path
) -> None:
    server = farm.add("ok", tls=server_context(ca, "127.0.0.1"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cluster = ClusterConfig(
        endpoints=[f"https://{server.address}"],
        health_check=check_config(interval="1s", timeout="900ms"),
        tls_ca_file=str(ca_file),
    )
    graph = make_graph({"api": cluster})
    table = HealthTable(graph.clusters, time.monotonic)
    stop = anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: run_active_checks(graph, table, stop=stop))
        # A request reaches the server only after the handshake verified.
        await wait_until(lambda: sum(server.requests.values()) >= 1)
        stop.set()
