"""Tests of `pgproxy demo`: `--requests N` run as a process, and the live table."""

from __future__ import annotations

import io
import subprocess
import sys

import anyio
import anyio.lowlevel
from rich.console import Console

from pgproxy.cli.demo import show_live
from pgproxy.server.demo import DemoUpstream
from pgproxy.server.listeners import bind_socket
from pgproxy.server.signals import ShutdownSignals


def test_demo_requests_spread_over_three_endpoints() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pgproxy", "demo", "--requests", "9"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "9/9 requests answered 200" in result.stdout
    rows = [
        line
        for line in result.stdout.splitlines()
        if "127.0.0.1:" in line and "│" in line
    ]
    assert len(rows) == 3, result.stdout
    for row in rows:
        assert "│        3 │" in row, result.stdout


def test_packaged_demo_config_matches_example() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    packaged = (root / "pgproxy" / "examples" / "demo.toml").read_text()
    example = (root / "examples" / "configs" / "demo.toml").read_text()
    assert packaged == example, "copy examples/configs/demo.toml to pgproxy/examples/"


def test_live_table_counts_last_requests() -> None:
    output = io.StringIO()
    console = Console(file=output, width=120, force_terminal=False)
    upstream = DemoUpstream(bind_socket("127.0.0.1", 0))

    async def main() -> None:
        signals = ShutdownSignals()
        async with anyio.create_task_group() as group:
            group.start_soon(show_live, console, [upstream], signals)
            await anyio.lowlevel.checkpoint()  # the first refresh shows 0 requests
            # Requests served since the last refresh, then Ctrl-C.
            upstream.served = 7
            signals.requested.set()

    try:
        anyio.run(main)
    finally:
        upstream.sock.close()
    rows = [line for line in output.getvalue().splitlines() if "127.0.0.1:" in line]
    assert rows, output.getvalue()
    assert "│        7 │" in rows[-1], output.getvalue()
