"""Runtime types of the routing graph: listeners, routes, clusters, endpoints.

A Graph is built once from a validated Config (see `pgproxy.graph.build`) and
never changes afterwards; a reload builds a new Graph and swaps it whole.
These types hold data only. Matching lives in `pgproxy.graph.routing` and
selection in `pgproxy.balancing`, both sans-IO.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from pgproxy.config.models import (
    ClusterConfig,
    Config,
    ListenerConfig,
    RespondConfig,
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream server. `address` is its identity, exactly as configured."""

    address: str
    host: str
    port: int
    tls: bool
    weight: int
    cluster: str

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True, slots=True)
class Cluster:
    """A named set of endpoints with the settings from its config table."""

    name: str
    endpoints: tuple[Endpoint, ...]
    config: ClusterConfig


@dataclass(frozen=True, slots=True)
class Listener:
    """A named listening address and its downstream limits."""

    name: str
    host: str
    port: int
    config: ListenerConfig


PathKind = Literal["any", "exact", "prefix", "regex"]


@dataclass(frozen=True, slots=True)
class Route:
    """One routing rule with its conditions normalised for fast matching.

    `host` is lower-case without a port; a wildcard host keeps its `*.` form.
    `headers` contains (lower-case name, exact value) pairs. `index` is the
    route's position in the file, used for tie-breaks and the default name.
    """

    name: str
    index: int
    listeners: frozenset[str]
    priority: int
    host: str | None
    path_kind: PathKind
    path: str
    path_regex: re.Pattern[str] | None
    methods: frozenset[str] | None
    headers: tuple[tuple[str, str], ...]
    cluster: str | None
    respond: RespondConfig | None
    strip_prefix: bool
    timeout: float
    retries: int
    retry_on: frozenset[str | int]


class Router(Protocol):
    """Finds the route for a request on one listener; see graph.routing."""

    def match(
        self,
        listener: str,
        method: str,
        host: str | None,
        path: str,
        headers: Mapping[str, str],
    ) -> Route | None:
        """Return the winning route, or None (the proxy responds with 404).

        `host` is the request's Host without port, lower-case; `headers` maps
        lower-case header names to values.
        """
        ...


@dataclass(frozen=True)
class Graph:
    """The immutable listener -> route -> cluster graph of one loaded config."""

    config: Config
    source: str
    listeners: Mapping[str, Listener]
    clusters: Mapping[str, Cluster]
    routes: tuple[Route, ...]
    router: Router = field(repr=False)

    def match(
        self,
        listener: str,
        method: str,
        host: str | None,
        path: str,
        headers: Mapping[str, str],
    ) -> Route | None:
        """Return the route for a request, or None; see Router.match."""
        return self.router.match(listener, method, host, path, headers)
