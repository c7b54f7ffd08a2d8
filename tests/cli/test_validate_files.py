"""`pgproxy validate --check-files`: TLS files of a config, loaded as run does."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner, Result

from pgproxy.cli.app import app

# Line 3 contains the listener's files, line 10 the cluster's CA file.
CONFIG = """\
[listeners.main]
address = "127.0.0.1:8443"
tls = {{ certificate = "{cert}", private_key = "{key}" }}

[[routes]]
cluster = "api"

[clusters.api]
endpoints = ["https://127.0.0.1:9443"]
tls_ca_file = "{ca}"
"""
CERT_COLUMN = 9
# Column of private_key when the certificate is "cert.pem".
KEY_COLUMN = CERT_COLUMN + len('certificate = "cert.pem", ')


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def conf(tmp_path: Path, ca: trustme.CA) -> Path:
    """Return a config directory with a good pair, a good CA and bad files."""
    directory = tmp_path / "conf"
    directory.mkdir()
    issued = ca.issue_cert("proxy.test")
    issued.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    issued.private_key_pem.write_to_path(str(directory / "key.pem"))
    ca.issue_cert("other.test").private_key_pem.write_to_path(
        str(directory / "other-key.pem")
    )
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    (directory / "garbage.pem").write_text("not a PEM file\n")
    (directory / "subdir").mkdir()
    return directory


def write_config(
    conf: Path, cert: str = "cert.pem", key: str = "key.pem", ca: str = "ca.pem"
) -> Path:
    path = conf / "pgproxy.toml"
    path.write_text(CONFIG.format(cert=cert, key=key, ca=ca))
    return path


def run(*args: str) -> Result:
    result = CliRunner().invoke(app, ["validate", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception
    )
    return result


def check_json(path: Path) -> tuple[int, list[dict[str, Any]]]:
    """Run `validate --check-files --format json`; return exit code, diagnostics."""
    result = run("--check-files", "--format", "json", str(path))
    return result.exit_code, json.loads(result.stdout)["diagnostics"]


def test_good_files_pass(conf: Path) -> None:
    code, diagnostics = check_json(write_config(conf))

    assert code == 0
    assert diagnostics == []


def test_missing_file_fails_only_with_flag(conf: Path) -> None:
    path = write_config(conf, cert="missing.pem")

    assert run(str(path)).exit_code == 0
    code, diagnostics = check_json(path)

    assert code == 1
    [diagnostic] = diagnostics
    assert diagnostic["code"] == "tls-file-missing"
    assert diagnostic["severity"] == "error"
    assert diagnostic["key"] == "listeners.main.tls.certificate"
    assert (diagnostic["line"], diagnostic["column"]) == (3, CERT_COLUMN)
    assert diagnostic["message"] == (f'certificate file "{conf}/missing.pem" not found')


def test_paths_resolved_against_config_dir(
    conf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(conf, key="sub/key.pem")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "cert.pem").write_text("not a PEM file\n")
    monkeypatch.chdir(elsewhere)

    code, diagnostics = check_json(Path(os.path.relpath(path)))

    assert code == 1
    [diagnostic] = diagnostics
    assert diagnostic["key"] == "listeners.main.tls.private_key"
    assert f'"{os.getcwd()}/../conf/sub/key.pem" not found' in diagnostic["message"]


def test_garbage_certificate(conf: Path) -> None:
    code, diagnostics = check_json(write_config(conf, cert="garbage.pem"))

    assert code == 1
    [diagnostic] = diagnostics
    assert diagnostic["code"] == "tls-file-invalid"
    assert diagnostic["key"] == "listeners.main.tls.certificate"
    assert "is not a PEM certificate chain" in diagnostic["message"]


def test_garbage_private_key(conf: Path) -> None:
    code, diagnostics = check_json(write_config(conf, key="garbage.pem"))

    assert code == 1
    [diagnostic] = diagnostics
    assert diagnostic["code"] == "tls-file-invalid"
    assert diagnostic["key"] == "listeners.main.tls.private_key"
    assert (diagnostic["line"], diagnostic["column"]) == (3, KEY_COLUMN)
    assert "is not a PEM private key" in diagnostic["message"]


def test_key_of_another_certificate(conf: Path) -> None:
    code, diagnostics = check_json(write_config(conf, key="other-key.pem"))

    assert code == 1
    [diagnostic] = diagnostics
    assert diagnostic["code"] == "tls-key-mismatch"
    assert diagnostic["key"] == "listeners.main.tls.private_key"
    assert diagnostic["message"] == (
        f'private key file "{conf}/other-key.pem" does not match the certificate '
        f'in "{conf}/cert.pem"'
    )


def test_encrypted_private_key(conf: Path, ca: trustme.CA) -> None:
    issued = ca.issue_cert("proxy.test")
    issued.cert_chain_pems[0].write_to_path(str(conf / "cert.pem"))
    key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (conf / "encrypted.pem").write_bytes(encrypted)

    code, diagnostics = check_json(write_config(conf, key="encrypted.pem"))

    assert code == 1
    [diagnostic] = diagnostics
    assert diagnostic["code"] == "tls-file-invalid"
    assert diagnostic["key"] == "listeners.main.tls.private_key"
    assert "is encrypted" in diagnostic["message"]


def test_directory_and_permission_denied(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(conf, cert="subdir", key="locked.pem")
    (conf / "locked.pem").write_text("")
    real_open = os.open

    def deny(file: str, *args: int, **kwargs: int) -> int:
        if Path(file).name == "locked.pem":
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    # Tests may run as root, which chmod cannot lock out.
    monkeypatch.setattr(os, "open", deny)
    code, diagnostics = check_json(path)

    assert code == 1
    by_key = {item["key"]: item for item in diagnostics}
    certificate = by_key["listeners.main.tls.certificate"]
    assert certificate["code"] == "tls-file-unreadable"
    assert certificate["message"].endswith("is a directory, not a file")
    private_key = by_key["listeners.main.tls.private_key"]
    assert private_key["code"] == "tls-file-unreadable"
    assert private_key["message"] == (
        f'cannot read private key file "{conf}/locked.pem": Permission denied'
    )


@pytest.mark.parametrize(
    ("ca_file", "code"),
    [("missing.pem", "tls-file-missing"), ("garbage.pem", "tls-file-invalid")],
)
def test_bad_ca_file(conf: Path, ca_file: str, code: str) -> None:
    exit_code, diagnostics = check_json(write_config(conf, ca=ca_file))

    assert exit_code == 1
    [diagnostic] = diagnostics
    assert diagnostic["code"] == code
    assert diagnostic["key"] == "clusters.api.tls_ca_file"
    assert (diagnostic["line"], diagnostic["column"]) == (10, 1)
    assert f'"{conf}/{ca_file}"' in diagnostic["message"]


def test_files_checked_beside_other_errors(conf: Path) -> None:
    path = write_config(conf, cert="missing.pem")
    path.write_text(path.read_text().replace('cluster = "api"', 'cluster = "ap"'))

    code, diagnostics = check_json(path)

    assert code == 1
    errors = [item["code"] for item in diagnostics if item["severity"] == "error"]
    assert errors == ["tls-file-missing", "unknown-cluster"]


def test_text_output(conf: Path) -> None:
    result = run("--check-files", str(write_config(conf, key="other-key.pem")))

    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(
        f"{conf}/pgproxy.toml:3:{KEY_COLUMN}: listeners.main.tls.private_key: "
        f'private key file "{conf}/other-key.pem" does not match'
    )
    assert lines[0].endswith("[tls-key-mismatch]")
    assert lines[-1] == "1 file checked: 1 error, 0 warnings"


def test_github_output(conf: Path) -> None:
    path = write_config(conf, ca="missing.pem")

    result = run("--check-files", "--format", "github", str(path))

    assert result.exit_code == 1
    assert result.stdout.splitlines()[0].startswith(
        f"::error file={path},line=10,col=1,title=clusters.api.tls_ca_file::CA file "
    )


def test_sarif_output(conf: Path) -> None:
    path = write_config(conf, cert="garbage.pem")

    result = run("--check-files", "--format", "sarif", str(path))

    assert result.exit_code == 1
    [sarif_run] = json.loads(result.stdout)["runs"]
    [found] = sarif_run["results"]
    assert found["ruleId"] == "tls-file-invalid"
    assert found["level"] == "error"
    region = found["locations"][0]["physicalLocation"]["region"]
    assert region == {"startLine": 3, "startColumn": CERT_COLUMN}
