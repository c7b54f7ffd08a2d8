"""Smoke test of `pgproxy run` as a process: ready lines, a proxied request, SIGTERM."""

from __future__ import annotations

import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

READY_TIMEOUT = 15.0


class _Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_run_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    config = tmp_path / "pgproxy.toml"
    config.write_text(
        '[listeners.main]\naddress = "127.0.0.1:0"\n\n[[routes]]\ncluster = "app"\n\n'
        f'[clusters.app]\nendpoints = ["127.0.0.1:{upstream.server_address[1]}"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgproxy", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not any(
            "pgproxy ready" in x for x in lines
        ):
            lines.append(proc.stderr.readline())
        match = next(
            (
                m
                for line in lines
                if (m := re.search(r'listener "main" listening on \S+:(\d+)', line))
            ),
            None,
        )
        assert match is not None, lines
        with urllib.request.urlopen(
            f"http://127.0.0.1:{match.group(1)}/x", timeout=5
        ) as reply:
            assert reply.status == 200
            assert reply.read() == b"hello"
            assert reply.headers["Via"] == "1.1 pgproxy"
        # `pgproxy run` replaced itself with the serving module (same pid),
        # which loaded the config out of process and never mapped pydantic.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert b"pgproxy.server.main" in cmdline
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "pydantic_core" not in maps
        assert "httptools" in maps  # the check reads the right process
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        upstream.shutdown()
        upstream.server_close()
    assert proc.returncode == 0, stderr
    assert "draining" in stderr
    assert "pgproxy stopped" in stderr
    assert '"status":200' in stdout
