"""The config loader child: results, diagnostics and failures of the child itself."""

from __future__ import annotations

import os
import pickle
import site
import sys
from pathlib import Path

import anyio
import pytest

import pgproxy
from pgproxy.errors import ConfigError
from pgproxy.graph.load import load_graph
from pgproxy.server import loading
from pgproxy.server.loading import decode_loaded, load_config, load_config_async

VALID = """\
[listeners.main]
address = "127.0.0.1:0"

[[routes]]
path_prefix = "/"
cluster = "app"

[clusters.app]
endpoints = ["127.0.0.1:9"]
"""


def test_valid_file_gives_the_graph_the_file_builds(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(VALID)
    loaded, payload = load_config(str(path))
    direct = load_graph(path)
    assert loaded.config_hash == direct.config_hash
    assert loaded.graph.routes == direct.graph.routes
    assert dict(loaded.graph.clusters) == dict(direct.graph.clusters)
    # The payload is what workers get: it decodes to the same graph.
    assert decode_loaded(payload, str(path)).config_hash == loaded.config_hash


def test_invalid_file_gives_every_positioned_diagnostic(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    text = VALID.replace('cluster = "app"', 'cluster = "ap"')
    path.write_text(text.replace('path_prefix = "/"', 'path_prefix = "/"\nhost = ""'))
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    found = {(item.code, item.line, item.column) for item in caught.value.diagnostics}
    assert ("invalid-host", 6, 1) in found
    assert ("unknown-cluster", 7, 1) in found


def test_async_load_matches_sync_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(VALID)

    async def main() -> str:
        loaded, _ = await load_config_async(str(path))
        return loaded.config_hash

    assert anyio.run(main) == load_config(str(path))[0].config_hash


def test_workers_get_tls_paths_resolved_against_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    tls = 'tls = { certificate = "cert.pem", private_key = "key.pem" }\n'
    (conf / "tls.toml").write_text(VALID.replace("[[routes]]", tls + "\n[[routes]]"))
    monkeypatch.chdir(tmp_path)

    _, payload = load_config("conf/tls.toml")

    # The payload is what the supervisor sends to every worker.
    graph = decode_loaded(payload, "conf/tls.toml").graph
    settings = graph.listeners["main"].settings.tls
    assert settings is not None
    assert settings.certificate == f"{os.getcwd()}/conf/cert.pem"
    assert settings.private_key == f"{os.getcwd()}/conf/key.pem"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path / "absent.toml"))
    assert caught.value.diagnostics[0].code != "loader-failed"


def test_crashing_loader_is_reported_as_loader_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(VALID)
    crash = [sys.executable, "-c", "import sys; sys.exit('loader exploded')"]
    monkeypatch.setattr(loading, "loader_command", lambda _: crash)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "loader-failed"
    assert "exited with code 1: loader exploded" in diagnostic.message


def test_package_root_is_put_first_on_pythonpath_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pgproxy, "__file__", str(tmp_path / "pgproxy/__init__.py"))
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = loading.package_environment()
    assert env["PYTHONPATH"] == f"{tmp_path}{os.pathsep}/elsewhere"
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    assert loading.package_environment()["PYTHONPATH"] == env["PYTHONPATH"]


def test_package_installed_in_site_packages_leaves_pythonpath_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = os.path.realpath(site.getsitepackages()[0])
    monkeypatch.setattr(pgproxy, "__file__", f"{folder}/pgproxy/__init__.py")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert "PYTHONPATH" not in loading.package_environment()


def test_killed_loader_is_reported_with_the_signal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(VALID)
    killed = [sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]
    monkeypatch.setattr(loading, "loader_command", lambda _: killed)
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "loader-failed"
    assert diagnostic.message == "the config loader process was killed by SIGKILL"


@pytest.mark.parametrize(
    "payload",
    [b"", b"not a pickle", pickle.dumps(("surprise", 1)), pickle.dumps(("ok", 1))],
)
def test_unreadable_payload_is_a_loader_failure(payload: bytes) -> None:
    with pytest.raises(ConfigError) as caught:
        decode_loaded(payload, "x.toml")
    assert caught.value.diagnostics[0].code == "loader-failed"
