"""Tests of the /status document and the merge of worker health tables."""

from __future__ import annotations

from pgproxy.server.status import merge_health, overlay_passive, status_document


def _state(status: str) -> dict[str, object]:
    return {"status": status, "reason": status, "consecutive_failures": 0}


def test_merge_keeps_least_healthy() -> None:
    merged = merge_health(
        {
            "0": {"api": {"a:1": _state("healthy"), "b:1": _state("healthy")}},
            "1": {"api": {"a:1": _state("ejected"), "b:1": _state("healthy")}},
        }
    )

    assert merged["api"]["a:1"]["status"] == "ejected"
    assert merged["api"]["a:1"]["workers"] == {"0": "healthy", "1": "ejected"}
    assert merged["api"]["b:1"]["status"] == "healthy"


def test_unhealthy_outranks_ejected() -> None:
    merged = merge_health(
        {
            "0": {"api": {"a:1": _state("unhealthy")}},
            "1": {"api": {"a:1": _state("ejected")}},
        }
    )

    assert merged["api"]["a:1"]["status"] == "unhealthy"


def test_single_process_snapshot() -> None:
    merged = merge_health({"0": {"api": {"a:1": _state("healthy")}}})

    assert merged == {
        "api": {"a:1": {**_state("healthy"), "workers": {"0": "healthy"}}}
    }


def test_status_document_shape() -> None:
    document = status_document(
        {"file": "x.toml", "hash": "abc"},
        {},
        [{"id": 0}],
        draining=True,
        monotonic_now=12.5,
    )

    assert document == {
        "config": {"file": "x.toml", "hash": "abc"},
        "draining": True,
        "monotonic_now": 12.5,
        "workers": [{"id": 0}],
        "clusters": {},
    }


def test_overlay_takes_passive_counts_from_supervisor() -> None:
    merged = merge_health(
        {
            "0": {"api": {"a:1": _state("ejected"), "b:1": _state("healthy")}},
            "1": {"api": {"a:1": _state("ejected"), "b:1": _state("healthy")}},
        }
    )
    decided = {
        "api": {
            "a:1": {**_state("ejected"), "ejections": 2},
            "b:1": {**_state("healthy"), "consecutive_failures": 3, "ejections": 0},
        },
    }

    overlay_passive(merged, decided)

    assert merged["api"]["a:1"]["ejections"] == 2
    assert merged["api"]["b:1"]["consecutive_failures"] == 3
    assert merged["api"]["b:1"]["workers"] == {"0": "healthy", "1": "healthy"}


def test_overlay_skips_endpoints_supervisor_lacks() -> None:
    merged = merge_health({"0": {"api": {"a:1": _state("healthy")}}})

    overlay_passive(merged, {"web": {"a:1": {"consecutive_failures": 9}}})

    assert merged["api"]["a:1"]["consecutive_failures"] == 0
