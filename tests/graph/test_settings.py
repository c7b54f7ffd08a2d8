"""Plain settings: they mirror the config models and survive pickling."""

from __future__ import annotations

import dataclasses
import ipaddress
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from pgproxy.config.models import (
    ClusterConfig,
    HealthCheckConfig,
    ListenerConfig,
    OutlierDetectionConfig,
    RespondConfig,
    ServerConfig,
    TlsConfig,
)
from pgproxy.graph.load import load_graph
from pgproxy.graph.settings import (
    DEFAULT_HEALTH_CHECK,
    ClusterSettings,
    HealthCheckSettings,
    ListenerSettings,
    OutlierDetectionSettings,
    RespondSettings,
    ServerSettings,
    TlsSettings,
    resolve_config_path,
    settings_from_config,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"

PAIRS = [
    (ServerSettings, ServerConfig),
    (TlsSettings, TlsConfig),
    (ListenerSettings, ListenerConfig),
    (RespondSettings, RespondConfig),
    (HealthCheckSettings, HealthCheckConfig),
    (OutlierDetectionSettings, OutlierDetectionConfig),
    (ClusterSettings, ClusterConfig),
]


@pytest.mark.parametrize(("settings", "model"), PAIRS)
def test_every_settings_field_is_a_model_field(settings: type, model: type) -> None:
    names = {field.name for field in dataclasses.fields(settings)}
    assert names <= set(model.model_fields), names - set(model.model_fields)


def test_cluster_settings_copy_nested_tables_and_values() -> None:
    model = ClusterConfig.model_validate(
        {
            "endpoints": ["127.0.0.1:9000"],
            "balancer": "consistent_hash",
            "hash_key": "header:x-user",
            "connect_timeout": "250ms",
            "health_check": {"path": "/ready", "expect_status": "200,204"},
            "outlier_detection": {"consecutive_failures": 7},
        },
        strict=False,
    )
    settings = settings_from_config(ClusterSettings, model)
    assert settings.balancer == "consistent_hash"
    assert settings.hash_key == "header:x-user"
    assert settings.connect_timeout == 0.25
    assert isinstance(settings.health_check, HealthCheckSettings)
    assert settings.health_check.path == "/ready"
    assert settings.health_check.expect_status == "200,204"
    assert isinstance(settings.outlier_detection, OutlierDetectionSettings)
    assert settings.outlier_detection.consecutive_failures == 7


def test_lists_and_tables_become_tuples() -> None:
    server = settings_from_config(
        ServerSettings,
        ServerConfig.model_validate({"trusted_proxies": ["10.0.0.0/8"]}, strict=False),
    )
    assert server.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)
    respond = settings_from_config(
        RespondSettings, RespondConfig(status=503, headers={"Retry-After": "30"})
    )
    assert respond.headers == (("Retry-After", "30"),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        respond.status = 200  # type: ignore[misc]


def test_listener_settings_keep_the_rejected_path_names() -> None:
    default = settings_from_config(
        ListenerSettings, ListenerConfig(address="127.0.0.1:0")
    )
    assert default.reject_ambiguous_paths == ()
    listener = settings_from_config(
        ListenerSettings,
        ListenerConfig(
            address="127.0.0.1:0",
            reject_ambiguous_paths=["backslash", "escaped_slash"],
        ),
    )
    assert listener.reject_ambiguous_paths == ("backslash", "escaped_slash")


def test_default_health_check_matches_the_model_defaults() -> None:
    model = settings_from_config(
        HealthCheckSettings,
        HealthCheckConfig(healthy_threshold=1, unhealthy_threshold=1),
    )
    assert model == DEFAULT_HEALTH_CHECK


@pytest.mark.parametrize(
    ("path", "resolved"),
    [
        ("cert.pem", "/etc/pgproxy/cert.pem"),
        ("tls/cert.pem", "/etc/pgproxy/tls/cert.pem"),
        ("./cert.pem", "/etc/pgproxy/./cert.pem"),
        ("../certs/cert.pem", "/etc/pgproxy/../certs/cert.pem"),
        ("/srv/tls/cert.pem", "/srv/tls/cert.pem"),
        ("~/cert.pem", "/etc/pgproxy/~/cert.pem"),
    ],
)
def test_resolve_config_path(path: str, resolved: str) -> None:
    assert resolve_config_path(path, "/etc/pgproxy") == resolved


def test_listener_tls_paths_resolved_against_config_dir() -> None:
    model = ListenerConfig(
        address="127.0.0.1:0",
        tls=TlsConfig(certificate="cert.pem", private_key="/keys/key.pem"),
    )
    settings = settings_from_config(ListenerSettings, model, "/etc/pgproxy")
    assert settings.tls == TlsSettings("/etc/pgproxy/cert.pem", "/keys/key.pem")


def test_cluster_ca_file_resolved_against_config_dir() -> None:
    model = ClusterConfig(endpoints=["https://a:443"], tls_ca_file="ca/bundle.pem")
    settings = settings_from_config(ClusterSettings, model, "/etc/pgproxy")
    assert settings.tls_ca_file == "/etc/pgproxy/ca/bundle.pem"
    unset = settings_from_config(ClusterSettings, ClusterConfig(endpoints=[]), "/x")
    assert unset.tls_ca_file is None


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_graph_of_each_example_survives_pickling(name: str) -> None:
    loaded = load_graph(EXAMPLES / name)
    copy = pickle.loads(pickle.dumps(loaded))
    assert copy.config_hash == loaded.config_hash
    assert copy.graph.server == loaded.graph.server
    assert dict(copy.graph.listeners) == dict(loaded.graph.listeners)
    assert dict(copy.graph.clusters) == dict(loaded.graph.clusters)
    assert copy.graph.routes == loaded.graph.routes
    for route in loaded.graph.routes:
        listener = next(iter(route.listeners or loaded.graph.listeners))
        path = route.path if route.path_kind in ("exact", "prefix") else "/"
        host = route.host.replace("*", "a") if route.host else None
        original = loaded.graph.match(listener, "GET", host, path, {})
        assert copy.graph.match(listener, "GET", host, path, {}) == original


def imported_modules(*modules: str) -> set[str]:
    """Return the modules that importing `modules` loads in a fresh interpreter."""
    code = f"import sys, {', '.join(modules)}\nprint('\\n'.join(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return set(done.stdout.split())


def test_serving_modules_import_no_config_models() -> None:
    # The serving process and its workers must stay free of pydantic (and
    # of the command-line stack), or each of them pays ~20 MiB for it.
    loaded = imported_modules("pgproxy.server.main", "pgproxy.server.worker_main")
    heavy = {"pydantic", "pydantic_core", "typer", "click", "rich"}
    assert {name.split(".")[0] for name in loaded} & heavy == set()
    assert "pgproxy.config.models" not in loaded
    assert not any(name.startswith("pgproxy.cli") for name in loaded)


def test_worker_imports_no_probe_or_admin_client() -> None:
    # The supervisor probes and serves the admin listener; a worker that
    # loaded httpcore or h11 would carry about 2 MiB it never uses.
    loaded = imported_modules("pgproxy.server.worker_main")
    clients = {"httpcore", "h11", "prometheus_client"}
    assert {name.split(".")[0] for name in loaded} & clients == set()
    assert "pgproxy.server.worker_main" in loaded  # the probe ran at all
