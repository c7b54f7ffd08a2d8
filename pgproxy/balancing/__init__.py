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
from pgproxy.balancing.least_request import LeastRequestBalancer
from pgproxy.balancing.random import RandomBalancer
from pgproxy.balancing.round_robin import RoundRobinBalancer
from pgproxy.graph.types import Cluster

__all__ = [
    "Balancer",
    "ConsistentHashBalancer",
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
    `client_ip`. `headers` maps lower-case names to values. A query value is
    returned raw (not percent-decoded), like nginx's `$arg_NAME`, so both
    proxies hash the same bytes. Returns None when the value is missing or
    empty, and the balancer then falls back to round robin.
    """
    kind, _, name = spec.partition(":")
    value: str | None
    if kind == "header":
        value = headers.get(name.lower())
    elif kind == "cookie":
        value = _cookie_value(headers.get("cookie"), name)
    elif kind == "query":
        value = _query_value(query, name)
    elif kind == "path":
        value = path
    elif kind == "client_ip":
        value = client_ip
    else:
        raise ValueError(f'invalid hash key "{spec}"')
    return value or None


def _cookie_value(header: str | None, name: str) -> str | None:
    # RFC 6265 section 5.4: pairs separated by "; ", first occurrence wins.
    if not header:
        return None
    for pair in header.split(";"):
        cookie_name, sep, value = pair.strip().partition("=")
        if sep and cookie_name == name:
            return value.strip('"')
    return None


def _query_value(query: str, name: str) -> str | None:
    # nginx's $arg_NAME compares names case-insensitively, without decoding,
    # and takes the first occurrence.
    target = name.lower()
    for pair in query.split("&"):
        arg_name, sep, value = pair.partition("=")
        if sep and arg_name.lower() == target:
            return value
    return None
