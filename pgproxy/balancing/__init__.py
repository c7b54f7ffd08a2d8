"""Endpoint selection: one balancer per cluster, pure and sans-IO.

A balancer is built once from a cluster's endpoint set and replaced whole
when that set changes. `candidates(key)` yields every endpoint of the
cluster at most once, in preference order; the proxy skips the endpoints that
are unhealthy, ejected or already tried, and stops at the first one it can
use. Health never enters a balancer, so a consistent-hash key whose endpoint
is healthy keeps its endpoint while others come and go.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from pgproxy.balancing.base import Balancer
from pgproxy.balancing.consistent_hash import ConsistentHashBalancer
from pgproxy.balancing.hash_key import HashKey
from pgproxy.balancing.least_request import LeastRequestBalancer
from pgproxy.balancing.random import RandomBalancer
from pgproxy.balancing.round_robin import RoundRobinBalancer
from pgproxy.graph.types import Cluster

__all__ = [
    "Balancer",
    "ConsistentHashBalancer",
    "HashKey",
    "LeastRequestBalancer",
    "RandomBalancer",
    "RoundRobinBalancer",
    "build_balancer",
    "hash_key_value",
]


def build_balancer(cluster: Cluster, rng: random.Random | None = None) -> Balancer:
    """Build the balancer that the cluster's `balancer` setting names.

    `rng` is the random source of least_request and random; pass a seeded
    one for reproducible picks. Raises ValueError for a cluster without
    endpoints.
    """
    endpoints = cluster.endpoints
    kind = cluster.settings.balancer
    if kind == "consistent_hash":
        return ConsistentHashBalancer(endpoints)
    if kind == "least_request":
        return LeastRequestBalancer(endpoints, rng)
    if kind == "random":
        return RandomBalancer(endpoints, rng)
    return RoundRobinBalancer(endpoints)


def hash_key_value(
    spec: str,
    headers: Mapping[str, str],
    path: str,
    query: str,
    client_ip: str,
) -> str | None:
    """Extract a request's consistent-hash key as `spec` describes it.

    `spec` is `header:NAME`, `cookie:NAME`, `query:NAME`, `path` or
    `client_ip`; see `HashKey`, which the proxy builds once per cluster.
    Raises ValueError for another `spec`.
    """
    return HashKey(spec).value(headers, path, query, client_ip)
