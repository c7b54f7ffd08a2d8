"""load_graph: positions of semantic diagnostics, warnings, hash, failures."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pgproxy.config.diagnostics import Severity
from pgproxy.errors import ConfigError
from pgproxy.graph.load import load_graph

VALID = """\
[listeners.public]
address = "127.0.0.1:8080"

[[routes]]
name = "api"
path_prefix = "/api"
cluster = "api"

[clusters.api]
endpoints = ["127.0.0.1:9001", "127.0.0.1:9002"]
"""


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "pgproxy.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_loads_graph_with_warnings(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID)
    loaded = load_graph(path)
    assert loaded.graph.match("public", "GET", None, "/api/x", {}) is not None
    assert loaded.config_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    (warning,) = loaded.diagnostics
    assert warning.code == "no-health-check"
    assert warning.severity is Severity.WARNING
    assert (warning.line, warning.column) == (9, 1)
    assert warning.source_line == "[clusters.api]"


def test_semantic_error_positioned(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID.replace('cluster = "api"', 'cluster = "apx"'))
    with pytest.raises(ConfigError) as caught:
        load_graph(path)
    diagnostics = caught.value.diagnostics
    error = next(d for d in diagnostics if d.code == "unknown-cluster")
    assert (error.file, error.line, error.column) == (str(path), 7, 1)
    assert error.source_line == 'cluster = "apx"'
    assert error.render().startswith(f"{path}:7:1: routes[0].cluster: ")
    # Warnings travel with the errors, so validate can show all of them.
    assert any(d.severity is Severity.WARNING for d in diagnostics)


def test_defaulted_key_falls_back_to_table(tmp_path: Path) -> None:
    text = VALID + '\n[clusters.api.health_check]\ninterval = "1s"\n'
    with pytest.raises(ConfigError) as caught:
        load_graph(_write(tmp_path, text))
    (error,) = caught.value.diagnostics
    assert error.code == "health-timeout-not-below-interval"
    assert error.line == 12
    assert error.source_line == "[clusters.api.health_check]"


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "file-empty"),
        (b"\x00\x01garbage", "file-binary"),
        (b"a = \xff\n", "file-encoding"),
        (b"[listeners\n", "toml-syntax"),
        (b"[listeners.a]\naddress = 80\n", "invalid-type"),
    ],
)
def test_loader_errors_pass_through(tmp_path: Path, content: bytes, code: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_graph(_write(tmp_path, content))
    assert code in [d.code for d in caught.value.diagnostics]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_graph(tmp_path / "absent.toml")
    assert [d.code for d in caught.value.diagnostics] == ["file-unreadable"]


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_graph(tmp_path)
    assert [d.code for d in caught.value.diagnostics] == ["file-unreadable"]


TLS = """\
[listeners.public]
address = "127.0.0.1:8443"
tls = { certificate = "certs/cert.pem", private_key = "/keys/key.pem" }

[[routes]]
cluster = "api"

[clusters.api]
endpoints = ["https://127.0.0.1:9001"]
tls_ca_file = "ca.pem"
"""


def test_relative_paths_follow_config_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "pgproxy.toml").write_text(TLS)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    graph = load_graph("../conf/pgproxy.toml").graph

    conf_dir = f"{os.getcwd()}/../conf"
    tls = graph.listeners["public"].settings.tls
    assert tls is not None
    assert tls.certificate == f"{conf_dir}/certs/cert.pem"
    assert tls.private_key == "/keys/key.pem"
    assert graph.clusters["api"].settings.tls_ca_file == f"{conf_dir}/ca.pem"
