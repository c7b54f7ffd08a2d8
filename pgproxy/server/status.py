"""The /status document: config in force, reloads, workers, endpoint health.

With several workers each one keeps its own health table. `merge_health`
reports an endpoint with the least healthy status any worker has for it,
and the status per worker. The supervisor decides passive ejections for its
workers, so `overlay_passive` takes the failure and ejection counts from the
supervisor's table: a worker's table does not count them.

The times of an endpoint (`since`, `ejected_until`) are readings of the
health tables' clock, time.monotonic(), which means nothing outside the
host. The document therefore carries `monotonic_now`, a reading of that
clock taken as it was built, and a reader computes ages from the difference.
Every process of one pgproxy reads the same system-wide monotonic clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

HealthSnapshot = Mapping[str, Mapping[str, Mapping[str, Any]]]

# Worse statuses rank higher; a worker that marks an endpoint unhealthy
# outweighs another one that still uses it.
_RANK = {"healthy": 0, "ejected": 1, "unhealthy": 2}

# Fields of `HealthTable.snapshot()` that only the deciding table counts.
_PASSIVE_FIELDS = ("consecutive_failures", "ejections")


def merge_health(snapshots: Mapping[str, HealthSnapshot]) -> dict[str, Any]:
    """Merge `HealthTable.snapshot()` results keyed by worker id."""
    clusters: dict[str, dict[str, dict[str, Any]]] = {}
    for worker, snapshot in sorted(snapshots.items()):
        for cluster, endpoints in snapshot.items():
            merged = clusters.setdefault(cluster, {})
            for address, state in endpoints.items():
                entry = merged.get(address)
                if entry is None or _rank(state) > _rank(entry):
                    by_worker = entry["workers"] if entry else {}
                    entry = merged[address] = {**state, "workers": by_worker}
                entry["workers"][worker] = state.get("status")
    return clusters


def overlay_passive(
    clusters: Mapping[str, Mapping[str, dict[str, Any]]], decided: HealthSnapshot
) -> None:
    """Set the passive counts of the merged `clusters` to those in `decided`."""
    for cluster, endpoints in clusters.items():
        decided_endpoints = decided.get(cluster, {})
        for address, entry in endpoints.items():
            state = decided_endpoints.get(address)
            if state is not None:
                for name in _PASSIVE_FIELDS:
                    entry[name] = state.get(name)


def _rank(state: Mapping[str, Any]) -> int:
    return _RANK.get(str(state.get("status")), 0)


def status_document(
    config: Mapping[str, Any],
    clusters: Mapping[str, Any],
    workers: Sequence[Mapping[str, Any]],
    *,
    draining: bool,
    monotonic_now: float,
) -> dict[str, Any]:
    """Assemble the /status JSON object.

    `monotonic_now` is the health tables' clock as the document is built.
    """
    return {
        "config": dict(config),
        "draining": draining,
        "monotonic_now": monotonic_now,
        "workers": list(workers),
        "clusters": dict(clusters),
    }
