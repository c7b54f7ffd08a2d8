"""Relative TLS file paths, started from another working directory.

A process manager starts `pgproxy run /etc/pgproxy/pgproxy.toml` from its
own working directory (systemd's default is /). A certificate path such as
"cert.pem" must still name the file next to the config, at start-up, in
every worker, and after a SIGHUP reload.
"""

from __future__ import annotations

import http.client
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from e2e_process import PgproxyProcess, write_config

CONFIG = """
[server]
access_log = "off"
drain_timeout = "1s"
workers = {workers}

[listeners.main]
address = "127.0.0.1:0"
tls = { certificate = "tls/cert.pem", private_key = "tls/key.pem" }

[[routes]]
respond = { status = 200, body = "ok" }
"""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def started() -> Iterator[list[PgproxyProcess]]:
    processes: list[PgproxyProcess] = []
    yield processes
    for process in processes:
        process.stop()


def write_cert(ca: trustme.CA, directory: Path, name: str) -> None:
    """Write a certificate for `name` and its key to directory/tls."""
    issued = ca.issue_cert(name)
    (directory / "tls").mkdir(exist_ok=True)
    issued.cert_chain_pems[0].write_to_path(str(directory / "tls" / "cert.pem"))
    issued.private_key_pem.write_to_path(str(directory / "tls" / "key.pem"))


def served_names(port: int, ca: trustme.CA) -> list[str]:
    """Send one HTTPS request; return the DNS names of the certificate served."""
    context = ssl.create_default_context()
    context.check_hostname = False
    ca.configure_trust(context)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"ok"
        assert conn.sock is not None
        peer = conn.sock.getpeercert()
    finally:
        conn.close()
    return [value for kind, value in peer["subjectAltName"] if kind == "DNS"]


@pytest.mark.parametrize("workers", [1, 2])
def test_relative_paths_from_other_cwd(
    ca: trustme.CA, tmp_path: Path, started: list[PgproxyProcess], workers: int
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    write_cert(ca, conf, "old.test")
    config = write_config(conf, CONFIG.replace("{workers}", str(workers)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    proxy = PgproxyProcess(config, cwd=elsewhere)
    started.append(proxy)
    proxy.start()
    proxy.wait_ready()
    port = proxy.port()
    assert served_names(port, ca) == ["old.test"]

    write_cert(ca, conf, "new.test")
    start = len(proxy.stderr_lines)
    proxy.signal(signal.SIGHUP)
    line = proxy.wait_for_stderr("reloaded", timeout=10.0, start=start)

    assert line is not None, proxy.stderr_text()
    # Each new connection may reach either worker.
    names = {tuple(served_names(port, ca)) for _ in range(10)}
    assert names == {("new.test",)}
