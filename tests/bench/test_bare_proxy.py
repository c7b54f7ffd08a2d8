"""The bare benchmark proxy relays real requests between real sockets.

The proxy runs as a child process, as the harness starts it, in front of a
threaded HTTP/1.1 server on 127.0.0.1 port 0 that records what it received.
"""

from __future__ import annotations

import http.client
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bare_proxy.py"
READY = "bare proxy listening on 127.0.0.1:"
SMALL_BODY = b"s" * 99 + b"\n"

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="the bare proxy needs uvloop"
)


class Recorder(BaseHTTPRequestHandler):
    """Serve fixed bodies and echo POST bodies; record ports and headers."""

    protocol_version = "HTTP/1.1"
    client_ports: ClassVar[list[int]] = []
    request_headers: ClassVar[list[dict[str, str]]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self) -> None:
        Recorder.client_ports.append(self.client_address[1])
        Recorder.request_headers.append({k.lower(): v for k, v in self.headers.items()})

    def do_GET(self) -> None:
        self._record()
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"hello ", b"world"):
                self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(SMALL_BODY)))
        self.end_headers()
        self.wfile.write(SMALL_BODY)

    def do_POST(self) -> None:
        self._record()
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_chunked(self) -> bytes:
        pieces = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            pieces.append(self.rfile.read(size))
            self.rfile.readline()
        self.rfile.readline()
        return b"".join(pieces)


@pytest.fixture
def upstream() -> Iterator[int]:
    Recorder.client_ports = []
    Recorder.request_headers = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


def start_proxy(upstream_port: int) -> tuple[subprocess.Popen[str], int]:
    command = [sys.executable, str(SCRIPT), "--upstream", f"127.0.0.1:{upstream_port}"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    line = process.stderr.readline()
    assert line.startswith(READY), line
    return process, int(line.removeprefix(READY))


@pytest.fixture
def proxy_port(upstream: int) -> Iterator[int]:
    process, port = start_proxy(upstream)
    yield port
    stop_proxy(process)


def stop_proxy(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == 0
    assert process.stderr is not None
    process.stderr.close()


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_keepalive_requests_share_upstream(proxy_port: int) -> None:
    client = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    bodies = []
    for _ in range(3):
        client.request("GET", "/small", headers={"X-Custom": "1"})
        bodies.append(client.getresponse().read())
    client.close()

    assert bodies == [SMALL_BODY] * 3
    assert len(set(Recorder.client_ports)) == 1
    assert Recorder.request_headers[0]["x-custom"] == "1"


def test_hop_by_hop_headers_dropped(proxy_port: int) -> None:
    client = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    hop_by_hop = {"Connection": "keep-alive", "Keep-Alive": "timeout=5", "TE": "x"}
    client.request("GET", "/small", headers=hop_by_hop)
    response = client.getresponse()
    response.read()
    client.close()

    received = Recorder.request_headers[0]
    assert "keep-alive" not in received
    assert "te" not in received
    assert "connection" not in received
    assert response.getheader("Connection") is None


def test_post_bodies_relayed(proxy_port: int) -> None:
    client = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    large = bytes(range(256)) * 4096
    client.request("POST", "/echo", body=large)
    echoed_length = client.getresponse().read()
    client.request("POST", "/echo", body=iter([b"ab", b"cd"]), encode_chunked=True)
    echoed_chunked = client.getresponse().read()
    client.close()

    assert echoed_length == large
    assert echoed_chunked == b"abcd"


def test_chunked_response_relayed(proxy_port: int) -> None:
    client = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
    client.request("GET", "/chunked")
    response = client.getresponse()
    body = response.read()
    client.request("GET", "/small")
    after = client.getresponse().read()
    client.close()

    assert response.getheader("Transfer-Encoding") == "chunked"
    assert body == b"hello world"
    assert after == SMALL_BODY


def test_connection_close_closes_client(proxy_port: int) -> None:
    request = b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        sock.sendall(request)
        first = read_until_closed(sock)
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        sock.sendall(request)
        second = read_until_closed(sock)

    assert first.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nconnection: close\r\n" in first
    assert first.endswith(SMALL_BODY)
    assert second.endswith(SMALL_BODY)
    # The proxy released the first client's upstream connection to its pool.
    assert len(set(Recorder.client_ports)) == 1


def test_pipelined_responses_in_order(proxy_port: int) -> None:
    pipelined = (
        b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        sock.sendall(pipelined)
        data = read_until_closed(sock)

    assert data.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert data.index(b"5\r\nworld\r\n") < data.index(SMALL_BODY)


def test_invalid_request_gets_400(proxy_port: int) -> None:
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        data = read_until_closed(sock)

    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_unreachable_upstream_gets_502() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    process, port = start_proxy(closed_port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
            data = read_until_closed(sock)
    finally:
        stop_proxy(process)

    assert data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
