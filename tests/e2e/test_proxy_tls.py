"""TLS on both sides of a running `pgproxy run`, with certificates from trustme.

The listener terminates TLS with a certificate from a test CA, and clients
trusting that CA speak HTTPS to it. `https://` endpoints are verified
against the cluster's `tls_ca_file`. A certificate from that CA for the
endpoint's address is accepted and its connection reused. One from another
CA, or for another host name, fails the request with 502 and a log line
naming the endpoint, and nothing reaches the upstream.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"
tls = {{ certificate = "{listener_cert}", private_key = "{listener_key}" }}

[[routes]]
path_prefix = "/plain"
cluster = "plain"

[[routes]]
path_prefix = "/trusted"
cluster = "trusted"

[[routes]]
path_prefix = "/untrusted"
cluster = "untrusted"

[[routes]]
path_prefix = "/wrong-host"
cluster = "wrong_host"

[clusters.plain]
endpoints = ["{plain}"]

[clusters.trusted]
endpoints = ["https://{trusted}"]
tls_ca_file = "{ca_file}"

[clusters.untrusted]
endpoints = ["https://{untrusted}"]
tls_ca_file = "{ca_file}"

[clusters.wrong_host]
endpoints = ["https://{wrong_host}"]
tls_ca_file = "{ca_file}"
"""


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TlsUpstream

    def do_GET(self) -> None:
        self.server.record(self.client_address[1], self.path)
        body = json.dumps({"target": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class TlsUpstream(ThreadingHTTPServer):
    """An HTTPS echo server on 127.0.0.1 port 0 that records client ports."""

    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _EchoHandler)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.address = f"127.0.0.1:{self.server_address[1]}"
        self.lock = threading.Lock()
        self.client_ports: set[int] = set()
        self.paths: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def record(self, client_port: int, path: str) -> None:
        """Record one request and the client port it came from."""
        with self.lock:
            self.client_ports.add(client_port)
            self.paths.append(path)

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self.shutdown()
        self.thread.join(5)
        self.server_close()


def _server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_upstreams(ca: trustme.CA) -> Iterator[dict[str, TlsUpstream]]:
    servers = {
        "trusted": TlsUpstream(_server_context(ca, "127.0.0.1")),
        "untrusted": TlsUpstream(_server_context(trustme.CA(), "127.0.0.1")),
        "wrong_host": TlsUpstream(_server_context(ca, "other.example")),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def plain_upstream(module_upstream_factory: UpstreamFactory) -> Upstream:
    return module_upstream_factory("plain")


@pytest.fixture(scope="module")
def proxy(
    module_pgproxy_factory: PgproxyFactory,
    tmp_path_factory: pytest.TempPathFactory,
    ca: trustme.CA,
    tls_upstreams: dict[str, TlsUpstream],
    plain_upstream: Upstream,
) -> PgproxyProcess:
    directory: Path = tmp_path_factory.mktemp("tls")
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    listener_cert = ca.issue_cert("127.0.0.1")
    cert_file = directory / "listener.pem"
    key_file = directory / "listener.key"
    listener_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    listener_cert.private_key_pem.write_to_path(str(key_file))
    config = CONFIG.format(
        listener_cert=cert_file,
        listener_key=key_file,
        ca_file=ca_file,
        plain=plain_upstream.address,
        **{name: server.address for name, server in tls_upstreams.items()},
    )
    return module_pgproxy_factory(config)


def _get(proxy: PgproxyProcess, ca: trustme.CA, path: str) -> tuple[int, bytes]:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    conn = http.client.HTTPSConnection(
        "127.0.0.1", proxy.port(), context=context, timeout=10
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_listener_serves_https(
    proxy: PgproxyProcess, ca: trustme.CA, plain_upstream: Upstream
) -> None:
    status, body = _get(proxy, ca, "/plain/one")

    assert status == 200
    document = json.loads(body)
    assert document["target"] == "/plain/one"
    forwarded = [v for k, v in document["headers"] if k.lower() == "x-forwarded-proto"]
    assert forwarded == ["https"]


def test_listener_rejects_client_not_trusting_ca(proxy: PgproxyProcess) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", proxy.port(), context=ssl.create_default_context(), timeout=10
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/plain/never")
    conn.close()


def test_https_endpoint_trusted_and_reused(
    proxy: PgproxyProcess, ca: trustme.CA, tls_upstreams: dict[str, TlsUpstream]
) -> None:
    upstream = tls_upstreams["trusted"]
    results = [_get(proxy, ca, f"/trusted/{index}") for index in range(3)]

    assert [status for status, _ in results] == [200, 200, 200]
    assert json.loads(results[2][1]) == {"target": "/trusted/2"}
    assert upstream.paths == ["/trusted/0", "/trusted/1", "/trusted/2"]
    assert len(upstream.client_ports) == 1, (
        "the pooled TLS connection to the endpoint was not reused"
    )


@pytest.mark.parametrize(
    ("name", "path"),
    [("untrusted", "/untrusted/x"), ("wrong_host", "/wrong-host/x")],
    ids=["other-ca", "wrong-host-name"],
)
def test_https_endpoint_verification_fails_502(
    proxy: PgproxyProcess,
    ca: trustme.CA,
    tls_upstreams: dict[str, TlsUpstream],
    name: str,
    path: str,
) -> None:
    upstream = tls_upstreams[name]
    start = len(proxy.stderr_lines)

    status, body = _get(proxy, ca, path)

    assert status == 502, body
    assert b"connect_failure" in body
    line = proxy.wait_for_stderr(upstream.address, timeout=5.0, start=start)
    assert line is not None, f"no log line names {upstream.address}"
    assert "certificate" in line, line
    assert upstream.paths == []
    record = proxy.access_for_path(path)
    assert record["failure"] == "connect_failure"
    assert record["endpoint"] == f"https://{upstream.address}"
