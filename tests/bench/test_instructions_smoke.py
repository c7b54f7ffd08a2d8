"""Smoke test of bench/instructions.py: a short count must finish and be sane.

The count itself is not asserted beyond being positive, because it depends on
the Python build. What must not rot is that the counter starts pgproxy under
callgrind, switches instrumentation on and off, and finds the totals line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.nginx, pytest.mark.e2e]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is missing")
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_short_count_prints_per_request() -> None:
    result = subprocess.run(
        [
            sys.executable, "bench/instructions.py",
            "--requests", "30", "--warmup", "10",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-4000:]
    match = re.search(r"for 30 requests: ([\d,]+) per request", result.stdout)
    assert match is not None, result.stdout
    assert int(match.group(1).replace(",", "")) > 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is missing")
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_concurrent_count_prints_cache_misses() -> None:
    result = subprocess.run(
        [
            sys.executable, "bench/instructions.py",
            "--requests", "30", "--warmup", "10",
            "--connections", "3", "--cache-sim",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-4000:]
    assert "for 30 requests:" in result.stdout
    match = re.search(r"cache misses per request: I1mr ([\d,]+)", result.stdout)
    assert match is not None, result.stdout
    assert int(match.group(1).replace(",", "")) > 0


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is missing")
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_count_over_new_connections() -> None:
    result = subprocess.run(
        [
            sys.executable, "bench/instructions.py",
            "--requests", "20", "--warmup", "5", "--close",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-4000:]
    match = re.search(r"for 20 requests: ([\d,]+) per request", result.stdout)
    assert match is not None, result.stdout
    assert int(match.group(1).replace(",", "")) > 0
