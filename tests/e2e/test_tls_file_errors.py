"""Missing or broken TLS files stop `pgproxy run` with one line, or fail a reload.

A listener's certificate and a cluster's tls_ca_file are loaded before
anything is served, by the single process or by the supervisor before it
starts workers, and again on every reload.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from e2e_process import PgproxyFactory

LISTENER_TLS = """
[server]
workers = {workers}
access_log = "off"

[listeners.main]
address = "127.0.0.1:0"
tls = {{ certificate = "missing.pem", private_key = "key.pem" }}

[[routes]]
respond = {{ status = 200, body = "ok" }}
"""

CA_FILE = """
[server]
workers = {workers}
access_log = "off"
drain_timeout = "1s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
cluster = "secure"

[clusters.secure]
endpoints = ["https://127.0.0.1:9"]
tls_ca_file = "{ca_file}"
"""


def run_until_exit(config: Path) -> subprocess.CompletedProcess[str]:
    """Run `pgproxy run CONFIG` and wait for it to exit."""
    return subprocess.run(
        [sys.executable, "-m", "pgproxy", "run", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ERROR")]


@pytest.mark.parametrize("workers", [1, 2])
def test_missing_certificate_fails_start(tmp_path: Path, workers: int) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text(LISTENER_TLS.format(workers=workers))

    done = run_until_exit(config)

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    assert 'listener "main"' in errors[0]
    assert str(tmp_path / "missing.pem") in errors[0]
    assert "listening on" not in done.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_missing_ca_file_fails_start(tmp_path: Path, workers: int) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text(CA_FILE.format(workers=workers, ca_file="missing-ca.pem"))

    done = run_until_exit(config)

    assert done.returncode == 1, done.stderr
    errors = error_lines(done.stderr)
    assert len(errors) == 1, done.stderr
    assert 'cluster "secure"' in errors[0]
    assert str(tmp_path / "missing-ca.pem") in errors[0]


@pytest.mark.parametrize("workers", [1, 2])
def test_broken_ca_file_fails_reload(
    pgproxy_factory: PgproxyFactory, tmp_path: Path, workers: int
) -> None:
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    proxy = pgproxy_factory(CA_FILE.format(workers=workers, ca_file=ca_file))

    ca_file.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    start = len(proxy.stderr_lines)
    proxy.signal(signal.SIGHUP)

    line = proxy.wait_for_stderr("reload failed", timeout=10.0, start=start)
    assert line is not None, proxy.stderr_text()
    assert 'cluster "secure"' in line
    assert str(ca_file) in line
