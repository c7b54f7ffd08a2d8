"""Which targets the harness measures on a scenario, and in which order."""

from __future__ import annotations

import sys
from pathlib import Path

# The harness imports itself as the top-level package `harness`, as
# bench/run.py does when run as a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from harness.measure import interleaved, skipped_targets, targets_for
from harness.scenarios import by_name

ALL = ["direct", "nginx", "pgproxy", "bare"]


def test_interleaved_even_run_unchanged() -> None:
    assert interleaved(ALL, 0) == ALL
    assert interleaved(ALL, 2) == ALL


def test_interleaved_odd_run_reverses_proxies() -> None:
    assert interleaved(ALL, 1) == ["direct", "bare", "pgproxy", "nginx"]
    assert interleaved(["direct", "nginx", "pgproxy"], 1) == [
        "direct",
        "pgproxy",
        "nginx",
    ]


def test_interleaved_keeps_other_targets_in_place() -> None:
    targets = ["direct", "nginx", "pgproxy", "pgproxy-json-log"]
    assert interleaved(targets, 1) == ["direct", "pgproxy", "nginx", "pgproxy-json-log"]


def test_bare_skipped_on_hash_scenario() -> None:
    hash_3 = by_name("hash-3")
    assert skipped_targets(hash_3, ALL) == {"bare": "it proxies to one upstream only"}
    assert targets_for(hash_3, ALL) == ["direct", "nginx", "pgproxy"]


def test_bare_measured_on_keepalive_scenario() -> None:
    keepalive = by_name("keepalive-100b")
    assert skipped_targets(keepalive, ALL) == {}
    assert targets_for(keepalive, ALL) == [*ALL, "pgproxy-json-log"]
