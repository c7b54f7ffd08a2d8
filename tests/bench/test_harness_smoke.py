"""Smoke test of the benchmark harness: one short run must produce its table.

No number is asserted, because a benchmark is not a test. What must not rot
is that `bench/run.py` starts every target, measures it, and writes a
well-formed page that keeps the hand-written sections of the old one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGETS = {"direct", "nginx", "pgproxy", "pgproxy-json-log", "bare"}
COLUMNS = 14

pytestmark = [pytest.mark.nginx, pytest.mark.e2e]


def _nginx_installed() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


def _results_rows(page: str) -> list[list[str]]:
    """Return the cells of the table under `## Results`, header first."""
    section = page.split("## Results\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.skipif(not _nginx_installed(), reason="nginx is not installed")
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
@pytest.mark.skipif(sys.platform != "linux", reason="the harness reads /proc")
def test_quick_run_writes_results_table(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text(
        "# Benchmarks\n\nstale text\n\n## Config and routing\n\nhand-written notes\n"
    )

    result = subprocess.run(
        [
            sys.executable, "bench/run.py", "--quick",
            "--scenarios", "keepalive-100b", "--out", str(out),
            "--targets", "direct", "nginx", "pgproxy", "bare",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-4000:]
    page = out.read_text()
    rows = _results_rows(page)
    header, separator, body = rows[0], rows[1], rows[2:]
    assert len(header) == COLUMNS
    assert separator == ["---"] * COLUMNS
    assert {row[1] for row in body} == TARGETS
    for row in body:
        assert len(row) == COLUMNS, row
        assert all(row), row
        assert row[0] == "keepalive-100b"
    assert "## Setup" in page
    assert "## Targets" in page
    assert "- bare: `bench/bare_proxy.py`" in page
    assert "## pgproxy against the bare stack" in page
    assert "| keepalive-100b | " in page.split("## pgproxy against the bare stack")[1]
    assert "stale text" not in page
    assert page.rstrip().endswith("## Config and routing\n\nhand-written notes")
