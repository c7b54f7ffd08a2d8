"""TLS certificates renewed in place, then SIGHUP, as certbot deployments do.

The certificate and key files keep their names and get new contents. After
the reload, new connections get the new certificate, connections opened
before keep working, and a broken file keeps the certificate in use.
"""

from __future__ import annotations

import http.client
import signal
import ssl
from pathlib import Path

import pytest
import trustme
from e2e_process import PgproxyFactory, PgproxyProcess

CONFIG = """
[server]
access_log = "off"
drain_timeout = "1s"
workers = {workers}

[listeners.main]
address = "127.0.0.1:0"
tls = {{ certificate = "{cert}", private_key = "{key}" }}

[[routes]]
respond = {{ status = 200, body = "ok" }}
"""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, directory: Path, name: str) -> tuple[Path, Path]:
    """Write a certificate for `name` and its key to cert.pem and key.pem."""
    issued = ca.issue_cert(name)
    cert, key = directory / "cert.pem", directory / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    ca.configure_trust(context)
    return context


def served_names(port: int, ca: trustme.CA) -> list[str]:
    """Return the DNS names of the certificate a new connection gets."""
    conn = http.client.HTTPSConnection(
        "127.0.0.1", port, context=client_context(ca), timeout=10
    )
    try:
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"ok"
        assert conn.sock is not None
        peer = conn.sock.getpeercert()
    finally:
        conn.close()
    return [value for kind, value in peer["subjectAltName"] if kind == "DNS"]


def reload_and_wait(process: PgproxyProcess, expect: str) -> str:
    """Send SIGHUP and return the log line that contains `expect`."""
    start = len(process.stderr_lines)
    process.signal(signal.SIGHUP)
    line = process.wait_for_stderr(expect, timeout=10.0, start=start)
    assert line is not None, f"no {expect!r} line:\n{process.stderr_text()}"
    return line


def test_renewed_certificate_served_after_reload(
    pgproxy_factory: PgproxyFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_cert(ca, tmp_path, "old.test")
    proxy = pgproxy_factory(CONFIG.format(workers=1, cert=cert, key=key))
    port = proxy.port()
    assert served_names(port, ca) == ["old.test"]
    before = http.client.HTTPSConnection(
        "127.0.0.1", port, context=client_context(ca), timeout=10
    )
    before.request("GET", "/")
    assert before.getresponse().read() == b"ok"

    write_cert(ca, tmp_path, "new.test")
    reload_and_wait(proxy, "reloaded")

    assert served_names(port, ca) == ["new.test"]
    # The connection opened before the reload stays usable.
    before.request("GET", "/")
    assert before.getresponse().read() == b"ok"
    before.close()


def test_broken_certificate_keeps_old_one(
    pgproxy_factory: PgproxyFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_cert(ca, tmp_path, "old.test")
    proxy = pgproxy_factory(CONFIG.format(workers=1, cert=cert, key=key))
    port = proxy.port()

    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    line = reload_and_wait(proxy, "reload failed")

    assert "cert.pem" in line, line
    assert served_names(port, ca) == ["old.test"]


def test_renewed_certificate_in_every_worker(
    pgproxy_factory: PgproxyFactory, ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_cert(ca, tmp_path, "old.test")
    proxy = pgproxy_factory(CONFIG.format(workers=2, cert=cert, key=key))
    port = proxy.port()

    write_cert(ca, tmp_path, "new.test")
    reload_and_wait(proxy, "reloaded")

    # The kernel spreads the 20 connections over both workers by a hash of each.
    names = {tuple(served_names(port, ca)) for _ in range(20)}
    assert names == {("new.test",)}
