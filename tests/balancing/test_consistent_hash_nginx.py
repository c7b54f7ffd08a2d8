"""The ketama ring against a real nginx running `hash $arg_k consistent`.

nginx proxies to small HTTP servers started here on 127.0.0.1 port 0; each
answers with its own address, and nginx's pick is compared with pgproxy's
for every key.
"""

from __future__ import annotations

import http.client
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pgproxy.balancing.consistent_hash import ConsistentHashBalancer
from pgproxy.graph.types import Endpoint

pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(
        shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
        reason="no nginx binary on PATH (CI installs the distribution's nginx)",
    ),
]

KEY_COUNT = 1200
START_TIMEOUT_S = 10.0


class _IdentityHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        port = self.server.server_address[1]  # type: ignore[index]
        body = f"127.0.0.1:{port}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstreams() -> Iterator[list[str]]:
    servers = [
        ThreadingHTTPServer(("127.0.0.1", 0), _IdentityHandler) for _ in range(5)
    ]
    threads = [
        threading.Thread(
            target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        for s in servers
    ]
    for thread in threads:
        thread.start()
    try:
        yield [f"127.0.0.1:{s.server_address[1]}" for s in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def _write_config(prefix: Path, port: int, servers: list[tuple[str, int]]) -> Path:
    lines = "\n".join(f"        server {address} weight={w};" for address, w in servers)
    temp = prefix / "temp"
    temp.mkdir()
    config = prefix / "nginx.conf"
    config.write_text(
        f"""
worker_processes 1;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    upstream pool {{
        hash $arg_k consistent;
{lines}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://pool;
            proxy_next_upstream off;
        }}
    }}
}}
"""
    )
    return config


def _start_nginx(prefix: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    command = [
        _nginx_binary(),
        "-p",
        str(prefix),
        "-e",
        str(prefix / "error.log"),
        "-c",
        str(config),
        "-g",
        f"daemon off; pid {prefix}/nginx.pid;",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (prefix / "error.log").read_text(errors="replace")
            pytest.fail(f"nginx exited with {process.returncode}: {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process
        except OSError:
            time.sleep(0.05)
    _stop(process)
    pytest.fail(f"nginx did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S}s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _nginx_picks(port: int, keys: list[str]) -> list[str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    picks = []
    try:
        for key in keys:
            connection.request("GET", f"/?k={key}")
            response = connection.getresponse()
            assert response.status == 200, key
            picks.append(response.read().decode())
    finally:
        connection.close()
    return picks


def _compare(tmp_path: Path, servers: list[tuple[str, int]]) -> None:
    port = _free_port()
    config = _write_config(tmp_path, port, servers)
    process = _start_nginx(tmp_path, config, port)
    keys = [f"user-{i}" for i in range(KEY_COUNT)]
    try:
        nginx = _nginx_picks(port, keys)
    finally:
        _stop(process)
    endpoints = [
        Endpoint(address, "127.0.0.1", int(address.rpartition(":")[2]), False, w, "c")
        for address, w in servers
    ]
    ring = ConsistentHashBalancer(endpoints)
    ours = [ring.pick(key).address for key in keys]
    mismatches = [
        (k, n, o) for k, n, o in zip(keys, nginx, ours, strict=True) if n != o
    ]
    assert mismatches == []
    assert len(set(nginx)) == len(servers)


def test_ring_matches_nginx(tmp_path: Path, upstreams: list[str]) -> None:
    _compare(tmp_path, [(address, 1) for address in upstreams])


def test_weighted_ring_matches_nginx(tmp_path: Path, upstreams: list[str]) -> None:
    weights = [1, 3, 2, 5, 1]
    _compare(tmp_path, list(zip(upstreams, weights, strict=True)))
