"""Runtime types of the routing graph: listeners, routes, clusters, endpoints.

A Graph is built once from a validated Config (see `pgproxy.graph.build`) and
never changes afterwards; a reload builds a new Graph and swaps it whole.
These types hold data only, and plain data: settings come from
`pgproxy.graph.settings`, not from the pydantic models, so a graph pickles
into a worker process that never imports pydantic. mypyc compiles these
classes, so each one pickles through `reduce_dataclass`. Matching lives in
`pgproxy.graph.routing` and selection in `pgproxy.balancing`, both sans-IO.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol

from pgproxy.config.diagnostics import Diagnostic
from pgproxy.graph.settings import (
    ClusterSettings,
    HeaderRulesSettings,
    ListenerSettings,
    RedirectSettings,
    RespondSettings,
    ServerSettings,
    reduce_dataclass,
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

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


@dataclass(frozen=True, slots=True)
class Cluster:
    """A named set of endpoints with the settings from its config table."""

    name: str
    endpoints: tuple[Endpoint, ...]
    settings: ClusterSettings

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


@dataclass(frozen=True, slots=True)
class Listener:
    """A named listening address and its downstream limits."""

    name: str
    host: str
    port: int
    settings: ListenerSettings

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


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
    respond: RespondSettings | None
    strip_prefix: bool
    timeout: float
    retries: int
    retry_on: frozenset[str | int]
    request_headers: HeaderRulesSettings | None = None
    response_headers: HeaderRulesSettings | None = None
    redirect: RedirectSettings | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)


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

    server: ServerSettings
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

    def __reduce__(self) -> tuple[Any, ...]:
        # Mapping proxies do not pickle; the graph travels as plain dicts and
        # is wrapped again on arrival.
        return (
            _rebuild_graph,
            (
                self.server,
                self.source,
                dict(self.listeners),
                dict(self.clusters),
                self.routes,
                self.router,
            ),
        )


def _rebuild_graph(
    server: ServerSettings,
    source: str,
    listeners: dict[str, Listener],
    clusters: dict[str, Cluster],
    routes: tuple[Route, ...],
    router: Router,
) -> Graph:
    return Graph(
        server,
        source,
        MappingProxyType(listeners),
        MappingProxyType(clusters),
        routes,
        router,
    )


@dataclass(frozen=True)
class LoadedGraph:
    """A Graph built from one file, its warnings and the hash of its bytes."""

    graph: Graph
    diagnostics: list[Diagnostic]
    # sha256 hex digest of the file's bytes; equal hashes mean equal configs.
    config_hash: str

    def __reduce__(self) -> tuple[Any, ...]:
        return reduce_dataclass(self)
