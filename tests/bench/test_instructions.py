"""The request paths that bench/instructions.py cycles through."""

from __future__ import annotations

import sys
from pathlib import Path

# instructions.py imports the harness as the top-level package `harness`,
# which needs bench/ on sys.path, as when it runs as a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from instructions import request_paths


def test_no_keys_keeps_path() -> None:
    assert request_paths("/hash?k=x", 0) == ["/hash?k=x"]


def test_keys_start_a_query() -> None:
    assert request_paths("/hash", 3) == ["/hash?k=0", "/hash?k=1", "/hash?k=2"]


def test_keys_extend_a_query() -> None:
    assert request_paths("/hash?a=1", 2) == ["/hash?a=1&k=0", "/hash?a=1&k=1"]
