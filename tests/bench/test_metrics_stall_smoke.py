"""Smoke test of bench/metrics_stall.py: a tiny run must finish and report.

The lateness is not asserted, because it depends on the machine's load.
What must not rot is that the script serves the config, scrapes it from
another process and prints both lines.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

_LINE_RE = r"{}: \d+ samples, max lateness [\d.]+ ms, p99 [\d.]+ ms, median [\d.]+ ms"


def test_tiny_run_prints_both_lines() -> None:
    result = subprocess.run(
        [
            sys.executable, "bench/metrics_stall.py",
            "--clusters", "5", "--per-cluster", "2",
            "--scrapes", "3", "--samples", "20",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(_LINE_RE.format("idle"), result.stdout), result.stdout
    assert re.search(_LINE_RE.format("scraped"), result.stdout), result.stdout
    assert "3 scrapes took" in result.stdout
