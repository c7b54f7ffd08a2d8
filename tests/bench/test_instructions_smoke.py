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
needs_tools = pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("nginx") is None,
    reason="valgrind or nginx is not installed",
)


def count(*options: str) -> str:
    """Run bench/instructions.py with `options` and return its output."""
    result = subprocess.run(
        [sys.executable, "bench/instructions.py", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def per_request(output: str, requests: int) -> int:
    """Return the instructions per request that the output reports."""
    match = re.search(rf"for {requests} requests: ([\d,]+) per request", output)
    assert match is not None, output
    return int(match.group(1).replace(",", ""))


@needs_tools
def test_short_count_prints_per_request() -> None:
    output = count("--requests", "30", "--warmup", "10")

    assert per_request(output, 30) > 0


@needs_tools
def test_concurrent_count_prints_cache_misses() -> None:
    output = count(
        "--requests", "30", "--warmup", "10", "--connections", "3", "--cache-sim"
    )

    assert per_request(output, 30) > 0
    match = re.search(r"cache misses per request: I1mr ([\d,]+)", output)
    assert match is not None, output
    assert int(match.group(1).replace(",", "")) > 0


@needs_tools
def test_count_over_new_connections() -> None:
    output = count("--requests", "20", "--warmup", "5", "--close")

    assert per_request(output, 20) > 0


@needs_tools
def test_count_cycles_hash_keys() -> None:
    output = count(
        "--requests", "20", "--warmup", "5", "--path", "/hash", "--keys", "4"
    )

    assert per_request(output, 20) > 0
