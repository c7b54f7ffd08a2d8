"""Test of `pgproxy demo --requests N`, run as a process."""

from __future__ import annotations

import subprocess
import sys


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
