"""Endpoint lists for balancer tests."""

from __future__ import annotations

from pgproxy.graph.types import Endpoint


def endpoints(*weights: int, cluster: str = "c") -> list[Endpoint]:
    """Return endpoints 10.0.0.1:8000, 10.0.0.2:8000, ... with these weights."""
    return [
        Endpoint(
            f"10.0.0.{i + 1}:8000", f"10.0.0.{i + 1}", 8000, False, weight, cluster
        )
        for i, weight in enumerate(weights)
    ]
