"""Connection limits through a real pgproxy process.

A listener's max_connections, and the cap each process derives from its
open file limit: a connection over either is reset as soon as it is
accepted, counted in /metrics and reported by a rate-limited warning.
"""

from __future__ import annotations

import socket
import ssl
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trustme
from e2e_admin import admin_port, labels, samples
from e2e_client import IncompleteResponse, RawConnection, build_request
from e2e_process import PgproxyFactory, PgproxyProcess, write_config
from e2e_upstream import Upstream, UpstreamFactory

CONFIG = """
[server]
access_log = "off"
drain_timeout = "1s"
admin = "127.0.0.1:0"

[listeners.main]
address = "127.0.0.1:0"
{limit}

[[routes]]
cluster = "a"

[clusters.a]
endpoints = ["{a}"]
"""

# Starts pgproxy with a soft open file limit of SOFT and a hard one of HARD.
LIMITED_START = textwrap.dedent(
    """
    import resource, runpy, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
    sys.argv = ["pgproxy", *sys.argv[3:]]
    runpy.run_module("pgproxy", run_name="__main__")
    """
)


REJECTED = ("pgproxy_downstream_connections_rejected_total", labels(listener="main"))
OPENED = ("pgproxy_downstream_connections_total", labels(listener="main"))
OPEN = ("pgproxy_downstream_connections_open", labels(listener="main"))


@pytest.fixture
def upstream(upstream_factory: UpstreamFactory) -> Upstream:
    return upstream_factory("a")


def is_served(conn: RawConnection) -> bool:
    """Send a GET on `conn`; return True for a 200, False if the connection ended."""
    try:
        conn.send(build_request("GET", "/"))
        response = conn.read_response("GET")
    except (OSError, IncompleteResponse):
        return False
    assert response.status == 200, response.describe()
    return True


def test_listener_limit_resets_extra(
    pgproxy_factory: PgproxyFactory, upstream: Upstream
) -> None:
    proxy = pgproxy_factory(
        CONFIG.format(a=upstream.address, limit="max_connections = 2")
    )
    port = proxy.port()
    first = RawConnection(port)
    second = RawConnection(port)
    try:
        assert is_served(first)
        assert is_served(second)
        with RawConnection(port) as third:
            assert not is_served(third), "a third connection was served"

        warning = proxy.wait_for_stderr("closing new client connections", timeout=5.0)
        assert warning is not None, proxy.stderr_text()
        assert 'listener "main"' in warning
        assert "max_connections = 2" in warning
        metrics = samples(admin_port(proxy))
        rejected = (
            "pgproxy_downstream_connections_rejected_total",
            labels(listener="main"),
        )
        assert metrics[rejected] == 1

        # A slot that frees up is taken by the next connection.
        first.close()
        assert_served_soon(port)
    finally:
        first.close()
        second.close()


def assert_served_soon(port: int, attempts: int = 50) -> None:
    """Check that a new connection is served once pgproxy has seen a close."""
    for _ in range(attempts):
        with RawConnection(port) as conn:
            if is_served(conn):
                return
    raise AssertionError(f"no connection served in {attempts} attempts")


def test_file_limit_caps_connections(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream
) -> None:
    # Soft 100, hard 120: pgproxy raises the soft limit to 120, so its cap is
    # (120 - 32) // 2 = 44 connections.
    directory = tmp_path_factory.mktemp("fdlimit")
    config = write_config(directory, CONFIG.format(a=upstream.address, limit=""))
    process = PgproxyProcess(config)
    process.args = [
        sys.executable,
        "-c",
        LIMITED_START,
        "100",
        "120",
        "run",
        str(config),
    ]
    process.start()
    conns: list[RawConnection] = []
    try:
        process.wait_ready()
        port = process.port()
        served = 0
        for _ in range(50):
            conn = RawConnection(port)
            conns.append(conn)
            served += is_served(conn)
        assert served == 44

        warning = process.wait_for_stderr("closing new client connections", timeout=5.0)
        assert warning is not None, process.stderr_text()
        assert "open file limit (120)" in warning
    finally:
        for conn in conns:
            conn.close()
        process.stop()


def test_limit_warning_rate_limited(
    pgproxy_factory: PgproxyFactory, upstream: Upstream
) -> None:
    proxy = pgproxy_factory(
        CONFIG.format(a=upstream.address, limit="max_connections = 1")
    )
    port = proxy.port()
    with RawConnection(port) as held:
        assert is_served(held)
        for _ in range(20):
            with RawConnection(port) as extra:
                assert not is_served(extra)
        metrics = samples(admin_port(proxy))

    rejected = (
        "pgproxy_downstream_connections_rejected_total",
        labels(listener="main"),
    )
    assert metrics[rejected] == 20
    warnings = [
        line for line in proxy.stderr_lines if "closing new client connections" in line
    ]
    assert len(warnings) == 1, warnings


def start_limited(config: Path, soft: int, hard: int) -> PgproxyProcess:
    """Start `pgproxy run config` with the given open file limits; wait for ready."""
    process = PgproxyProcess(config)
    process.args = [
        sys.executable,
        "-c",
        LIMITED_START,
        str(soft),
        str(hard),
        "run",
        str(config),
    ]
    process.start()
    process.wait_ready()
    return process


def test_admin_survives_descriptor_exhaustion(
    tmp_path_factory: pytest.TempPathFactory, upstream: Upstream
) -> None:
    # With 64 descriptors, 70 admin connections run the process out of them
    # before the admin listener's own limit of 64 connections is reached.
    directory = tmp_path_factory.mktemp("adminfd")
    config = write_config(directory, CONFIG.format(a=upstream.address, limit=""))
    process = start_limited(config, 64, 64)
    conns: list[socket.socket] = []
    try:
        port = admin_port(process)
        for _ in range(70):
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        warning = process.wait_for_stderr("admin listener: accept failed", timeout=10.0)
        assert warning is not None, process.stderr_text()
        assert "Too many open files" in warning
        for conn in conns:
            conn.close()
        conns.clear()

        assert process.proc is not None
        assert process.proc.poll() is None, process.stderr_text()
        metrics = samples(port)
        assert REJECTED in metrics
        with RawConnection(process.port()) as conn:
            assert is_served(conn)
    finally:
        for conn in conns:
            conn.close()
        process.stop()


TLS_CONFIG = """
[server]
access_log = "off"
drain_timeout = "1s"
admin = "127.0.0.1:0"
workers = {workers}

[listeners.main]
address = "127.0.0.1:0"
max_connections = {limit}
tls = {{ certificate = "{pem}", private_key = "{pem}" }}

[[routes]]
cluster = "a"

[clusters.a]
endpoints = ["{a}"]
"""


def is_reset(conn: socket.socket) -> bool:
    """Return True if pgproxy ends `conn` within 5 s, False if it keeps it open."""
    conn.settimeout(5.0)
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def start_tls_proxy(
    pgproxy_factory: PgproxyFactory,
    upstream: Upstream,
    tmp_path: Path,
    workers: int,
    limit: int,
) -> tuple[PgproxyProcess, ssl.SSLContext]:
    """Start pgproxy with a TLS listener; return it and a client context trusting it."""
    authority = trustme.CA()
    pem = tmp_path / "server.pem"
    authority.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(pem)
    )
    proxy = pgproxy_factory(
        TLS_CONFIG.format(a=upstream.address, pem=pem, workers=workers, limit=limit)
    )
    client = ssl.create_default_context()
    authority.configure_trust(client)
    return proxy, client


def test_tls_handshakes_count_against_limit(
    pgproxy_factory: PgproxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    # Connections that never start their handshake hold a descriptor each,
    # so they take the listener's slots like any other connection.
    proxy, client = start_tls_proxy(pgproxy_factory, upstream, tmp_path, 1, 2)
    port = proxy.port()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", port)) as extra:
            assert is_reset(extra), "a third connection was kept open"
        warning = proxy.wait_for_stderr("closing new client connections", timeout=5.0)
        assert warning is not None, proxy.stderr_text()
        assert "max_connections = 2" in warning
        assert samples(admin_port(proxy))[REJECTED] == 1
    finally:
        for conn in silent:
            conn.close()

    for _ in range(50):
        with socket.create_connection(("127.0.0.1", port), timeout=5.0) as raw:
            try:
                conn = client.wrap_socket(raw, server_hostname="127.0.0.1")
            except (OSError, ssl.SSLError):
                continue  # pgproxy has not seen the silent connections close yet
            with conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                assert conn.recv(12) == b"HTTP/1.1 200"
                return
    raise AssertionError("no TLS connection served in 50 attempts")


def wait_for_sample(
    proxy: PgproxyProcess, sample: tuple[str, tuple[tuple[str, str], ...]], value: float
) -> float:
    """Scrape until `sample` has `value`, for 5 s at most; return its last value."""
    port = admin_port(proxy)
    deadline = time.monotonic() + 5.0
    current = samples(port).get(sample, 0.0)
    while current != value and time.monotonic() < deadline:
        time.sleep(0.05)
        current = samples(port).get(sample, 0.0)
    return current


def test_tls_connections_counted_from_accept(
    pgproxy_factory: PgproxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    # A connection that has not finished its handshake takes a descriptor
    # and a slot of the limits, so the connection gauges count it too.
    proxy, client = start_tls_proxy(pgproxy_factory, upstream, tmp_path, 1, 100)
    port = proxy.port()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        assert wait_for_sample(proxy, OPEN, 2.0) == 2.0
        assert wait_for_sample(proxy, OPENED, 2.0) == 2.0
    finally:
        for conn in silent:
            conn.close()
    assert wait_for_sample(proxy, OPEN, 0.0) == 0.0

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10.0) as raw,
        client.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        conn.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.recv(12) == b"HTTP/1.1 200"
        # Counted once, at the accept, not again when the handshake ends.
        assert wait_for_sample(proxy, OPEN, 1.0) == 1.0
        assert wait_for_sample(proxy, OPENED, 3.0) == 3.0
    assert wait_for_sample(proxy, OPEN, 0.0) == 0.0
    assert samples(admin_port(proxy))[OPENED] == 3.0


def test_tls_request_right_after_handshake(
    pgproxy_factory: PgproxyFactory, upstream: Upstream, tmp_path: Path
) -> None:
    # The ClientHello can arrive before the handshake starts, and the request
    # together with the client's Finished message; neither may be lost.
    proxy, client = start_tls_proxy(pgproxy_factory, upstream, tmp_path, 2, 100)
    port = proxy.port()
    for attempt in range(40):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10.0) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
        ):
            conn.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert conn.recv(12) == b"HTTP/1.1 200", f"connection {attempt}"
