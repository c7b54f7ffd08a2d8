"""Tests of `pgproxy check-upstreams` against real loopback servers."""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme
from typer.testing import CliRunner, Result

from pgproxy.cli.app import app
from pgproxy.cli.check_upstreams import check_clusters, exit_code
from pgproxy.graph.load import load_graph
from pgproxy.health.active import default_ssl_context
from tests.health.servers import ServerFarm, refused_port, server_farm

HEADER = """
[listeners.main]
address = "127.0.0.1:0"
"""


@pytest.fixture
def farm() -> Iterator[ServerFarm]:
    with server_farm() as farm:
        yield farm


def cluster_toml(
    name: str, endpoints: list[str], check: str | None = 'path = "/healthz"'
) -> str:
    listed = ", ".join(f'"{address}"' for address in endpoints)
    text = f'\n[[routes]]\npath_prefix = "/{name}"\ncluster = "{name}"\n'
    text += f"\n[clusters.{name}]\nendpoints = [{listed}]\n"
    if check is not None:
        text += f'\n[clusters.{name}.health_check]\ntimeout = "1s"\n{check}\n'
    return text


def write_config(tmp_path: Path, *clusters: str) -> Path:
    path = tmp_path / "pgproxy.toml"
    path.write_text(HEADER + "".join(clusters))
    return path


def run(*args: str) -> Result:
    # Wide enough that no table cell wraps.
    return CliRunner().invoke(app, ["check-upstreams", *args], env={"COLUMNS": "200"})


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = run(*args, "--format", "json")
    return result.exit_code, json.loads(result.stdout)


def endpoints_by_address(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        ep["address"]: ep
        for cluster in document["clusters"]
        for ep in cluster["endpoints"]
    }


# Exit codes.


def test_all_up_exits_0(farm: ServerFarm, tmp_path: Path) -> None:
    servers = [farm.add("ok"), farm.add("ok")]
    config = write_config(tmp_path, cluster_toml("api", [s.address for s in servers]))
    result = run(str(config))
    assert result.exit_code == 0, result.output
    assert "api: 2/2 healthy, can serve" in result.stdout
    assert all(s.requests["/healthz"] == 1 for s in servers)


def test_some_down_exits_1(farm: ServerFarm, tmp_path: Path) -> None:
    good, bad = farm.add("ok"), farm.add("status:500")
    config = write_config(tmp_path, cluster_toml("api", [good.address, bad.address]))
    code, document = run_json(str(config))
    assert code == 1
    assert document["exit_code"] == 1
    [cluster] = document["clusters"]
    assert cluster["healthy"] == 1
    assert cluster["can_serve"] is True


def test_cluster_without_healthy_endpoint_exits_2(
    farm: ServerFarm, tmp_path: Path
) -> None:
    good = farm.add("ok")
    config = write_config(
        tmp_path,
        cluster_toml("api", [good.address]),
        cluster_toml("web", [f"127.0.0.1:{refused_port()}"]),
    )
    result = run(str(config))
    assert result.exit_code == 2
    assert "api: 1/1 healthy, can serve" in result.stdout
    assert "web: 0/1 healthy, cannot serve: no healthy endpoint" in result.stdout


def test_invalid_config_exits_3(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        HEADER + '\n[clusters.api]\nendpoints = ["127.0.0.1:1"]\nbalancr = "x"\n'
    )
    result = run(str(config))
    assert result.exit_code == 3
    assert "bad.toml:" in result.stderr
    assert "balancr" in result.stderr
    assert "error: invalid config" in result.stderr
    assert result.stdout == ""


def test_invalid_config_json_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[listeners.main\n")
    code, document = run_json(str(config))
    assert code == 3
    assert document["version"] == 1
    assert document["exit_code"] == 3
    assert document["error"] == "invalid config"
    assert len(document["diagnostics"]) >= 1
    assert document["clusters"] == []


def test_unreadable_file_exits_3(tmp_path: Path) -> None:
    result = run(str(tmp_path / "missing.toml"))
    assert result.exit_code == 3
    assert "missing.toml" in result.stderr


def test_unknown_position_left_out(tmp_path: Path) -> None:
    directory = tmp_path / "dir.toml"
    directory.mkdir()

    result = run(str(directory))

    assert result.exit_code == 3
    assert f"{directory}: is a directory, not a file\n" in result.stderr
    assert ":0:0" not in result.stderr


@pytest.mark.timeout(10)
def test_fifo_config_exits_3(tmp_path: Path) -> None:
    fifo = tmp_path / "pgproxy.toml"
    os.mkfifo(fifo)

    result = run(str(fifo))

    assert result.exit_code == 3
    assert "not a regular file: it is a FIFO (named pipe)" in result.stderr


def test_unknown_cluster_exits_3(farm: ServerFarm, tmp_path: Path) -> None:
    server = farm.add("ok")
    config = write_config(tmp_path, cluster_toml("api", [server.address]))
    result = run(str(config), "--cluster", "nope")
    assert result.exit_code == 3
    assert "unknown cluster nope (clusters: api)" in result.stderr
    assert server.connections == 0


@pytest.mark.parametrize(
    "options",
    [
        ["--timeout", "10"],
        ["--format", "yaml"],
        ["--no-such-option"],
    ],
)
def test_invalid_options_exit_3(tmp_path: Path, options: list[str]) -> None:
    config = write_config(tmp_path, cluster_toml("api", ["127.0.0.1:1"]))
    result = run(str(config), *options)
    assert result.exit_code == 3


def test_missing_argument_exits_3() -> None:
    assert run().exit_code == 3


# Failing stages.


def test_each_failing_stage(farm: ServerFarm, tmp_path: Path) -> None:
    good = farm.add("ok")
    wrong = farm.add("status:503")
    hanging = farm.add("hang")
    garbage = farm.add("garbage")
    refused = f"127.0.0.1:{refused_port()}"
    unresolvable = "upstream.invalid:8080"
    addresses = [good.address, wrong.address, hanging.address, garbage.address]
    addresses += [refused, unresolvable]
    config = write_config(tmp_path, cluster_toml("api", addresses))

    code, document = run_json(str(config))
    assert code == 1
    endpoints = endpoints_by_address(document)
    expected = {
        good.address: ("UP", "ok", 200),
        wrong.address: ("DOWN", "http_status", 503),
        hanging.address: ("DOWN", "http_timeout", None),
        garbage.address: ("DOWN", "protocol_error", None),
        refused: ("DOWN", "tcp_refused", None),
        unresolvable: ("DOWN", "dns", None),
    }
    for address, (verdict, stage, status) in expected.items():
        ep = endpoints[address]
        assert (ep["verdict"], ep["stage"], ep["status"]) == (verdict, stage, status)
    assert endpoints[refused]["detail"] == "Connection refused"

    text = run(str(config)).stdout
    for label in ("HTTP status 503", "HTTP timeout", "protocol error", "TCP refused"):
        assert label in text
    assert "DNS" in text
    assert "api: 1/6 healthy, can serve" in text


def test_status_outside_range_fails_http_stage(
    farm: ServerFarm, tmp_path: Path
) -> None:
    top = farm.add("status:599")
    high = farm.add("status:600")
    highest = farm.add("status:999")
    addresses = [top.address, high.address, highest.address]
    check = 'path = "/healthz"\nexpect_status = "100-599"'
    config = write_config(tmp_path, cluster_toml("api", addresses, check))

    code, document = run_json(str(config))
    assert code == 1
    endpoints = endpoints_by_address(document)
    assert endpoints[top.address]["verdict"] == "UP"
    for server, status in ((high, 600), (highest, 999)):
        ep = endpoints[server.address]
        assert (ep["verdict"], ep["stage"], ep["status"]) == (
            "DOWN",
            "http_status",
            status,
        )
        assert ep["detail"] == f"status {status} is outside 100-599"

    text = run(str(config)).stdout
    assert "HTTP status 600" in text
    assert "HTTP status 999" in text
    assert "api: 1/3 healthy, can serve" in text


def test_tcp_check_without_health_check(farm: ServerFarm, tmp_path: Path) -> None:
    hanging = farm.add("hang")
    refused = f"127.0.0.1:{refused_port()}"
    config = write_config(
        tmp_path, cluster_toml("api", [hanging.address, refused], None)
    )
    code, document = run_json(str(config))
    assert code == 1
    [cluster] = document["clusters"]
    assert cluster["check"] == {"type": "tcp", "timeout_s": 5.0}
    endpoints = endpoints_by_address(document)
    assert endpoints[hanging.address]["verdict"] == "UP"
    assert endpoints[refused]["stage"] == "tcp_refused"
    assert sum(hanging.requests.values()) == 0


def test_json_shape(farm: ServerFarm, tmp_path: Path) -> None:
    server = farm.add("ok")
    config = write_config(tmp_path, cluster_toml("api", [server.address]))
    code, document = run_json(str(config))
    assert code == 0
    assert set(document) == {
        "version",
        "config",
        "exit_code",
        "duration_s",
        "error",
        "clusters",
    }
    assert document["version"] == 1
    assert document["config"] == str(config)
    assert document["error"] is None
    [cluster] = document["clusters"]
    assert cluster["name"] == "api"
    assert cluster["check"] == {
        "type": "http",
        "method": "GET",
        "path": "/healthz",
        "expect_status": "200-399",
        "timeout_s": 1.0,
    }
    assert (cluster["healthy"], cluster["total"], cluster["can_serve"]) == (1, 1, True)
    [endpoint] = cluster["endpoints"]
    assert set(endpoint) == {
        "address",
        "verdict",
        "stage",
        "status",
        "latency_ms",
        "detail",
    }
    assert endpoint["address"] == server.address
    assert endpoint["verdict"] == "UP"
    assert endpoint["stage"] == "ok"
    assert endpoint["status"] == 200
    assert isinstance(endpoint["latency_ms"], float)


def test_cluster_option_limits_check(farm: ServerFarm, tmp_path: Path) -> None:
    good, down = farm.add("ok"), farm.add("status:500")
    config = write_config(
        tmp_path,
        cluster_toml("api", [good.address]),
        cluster_toml("web", [down.address]),
    )
    code, document = run_json(str(config), "--cluster", "api")
    assert code == 0
    assert [c["name"] for c in document["clusters"]] == ["api"]
    assert down.connections == 0
    code, document = run_json(str(config), "--cluster", "web", "--cluster", "api")
    assert code == 2
    assert [c["name"] for c in document["clusters"]] == ["web", "api"]


# Bounds.


def test_200_endpoints_with_50_hanging(farm: ServerFarm, tmp_path: Path) -> None:
    probe_timeout = 1.0
    hanging = [farm.add("hang") for _ in range(50)]
    good = [farm.add("ok") for _ in range(150)]
    addresses = [s.address for s in good + hanging]
    config = write_config(tmp_path, cluster_toml("api", addresses))

    started = time.monotonic()
    code, document = run_json(str(config))
    elapsed = time.monotonic() - started

    print(f"check of 200 endpoints, 50 hanging: {elapsed:.2f}s")
    assert code == 1
    [cluster] = document["clusters"]
    assert cluster["healthy"] == 150
    stages = [ep["stage"] for ep in cluster["endpoints"]]
    assert stages.count("http_timeout") == 50
    assert elapsed < 3 * probe_timeout


def test_timeout_option_bounds_probes(farm: ServerFarm, tmp_path: Path) -> None:
    hanging = farm.add("hang")
    check = 'path = "/healthz"\ninterval = "1m"'
    text = cluster_toml("api", [hanging.address], check).replace('"1s"', '"30s"')
    config = write_config(tmp_path, text)
    started = time.monotonic()
    code, document = run_json(str(config), "--timeout", "500ms")
    elapsed = time.monotonic() - started
    assert code == 2
    [endpoint] = document["clusters"][0]["endpoints"]
    assert endpoint["stage"] == "http_timeout"
    assert elapsed < 5.0


def test_probes_past_bound_are_skipped(farm: ServerFarm, tmp_path: Path) -> None:
    hanging = [farm.add("hang") for _ in range(3)]
    config = write_config(tmp_path, cluster_toml("api", [s.address for s in hanging]))
    graph = load_graph(config).graph
    reports = anyio.run(check_clusters, list(graph.clusters.values()), 0.3, 1)
    verdicts = [ep.verdict for ep in reports[0].endpoints]
    assert verdicts == ["DOWN", "SKIPPED", "SKIPPED"]
    assert exit_code(reports) == 3


# Private CA.


def test_https_endpoint_verified_with_tls_ca_file(
    farm: ServerFarm, tmp_path: Path
) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = farm.add("ok", tls=context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    endpoint = f"https://{server.address}"
    without_ca = write_config(tmp_path, cluster_toml("api", [endpoint]))
    code, document = run_json(str(without_ca))
    assert code == 2, "the system store does not trust the private CA"
    assert endpoints_by_address(document)[endpoint]["stage"] == "tls"

    with_ca = cluster_toml("api", [endpoint]).replace(
        "[clusters.api.health_check]",
        f'tls_ca_file = "{ca_file}"\n\n[clusters.api.health_check]',
    )
    config = write_config(tmp_path, with_ca)
    code, document = run_json(str(config))
    assert code == 0, document
    assert endpoints_by_address(document)[endpoint]["verdict"] == "UP"


def test_tls_context_load_stalls_no_probe(
    farm: ServerFarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CA store that takes 1.5s to load. Loaded on the event loop while the
    # probes run, it would hold the plain probe past its 1s timeout.
    create_default_context = ssl.create_default_context

    def slow_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        time.sleep(1.5)
        return create_default_context(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", slow_context)
    default_ssl_context.cache_clear()
    plain = farm.add("ok")
    tls = farm.add("hang")
    config = write_config(
        tmp_path,
        cluster_toml("plain", [plain.address]),
        cluster_toml("secure", [f"https://{tls.address}"]),
    )
    try:
        code, document = run_json(str(config))
    finally:
        default_ssl_context.cache_clear()
    result = endpoints_by_address(document)[plain.address]
    assert result["verdict"] == "UP", result
    assert code == 2, "the TLS endpoint never completes its handshake"


def test_relative_tls_ca_file_next_to_config(
    farm: ServerFarm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = farm.add("ok", tls=context)
    conf = tmp_path / "conf"
    conf.mkdir()
    ca.cert_pem.write_to_path(str(conf / "ca.pem"))
    endpoint = f"https://{server.address}"
    text = cluster_toml("api", [endpoint]).replace(
        "[clusters.api.health_check]",
        'tls_ca_file = "ca.pem"\n\n[clusters.api.health_check]',
    )
    config = write_config(conf, text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    code, document = run_json(str(config))

    assert code == 0, document
    assert endpoints_by_address(document)[endpoint]["verdict"] == "UP"
