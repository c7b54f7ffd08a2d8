"""Build the immutable routing graph from a validated Config, with semantic checks.

The pydantic models check each table alone; this module checks what spans
tables and what the models cannot see. Every problem becomes a Diagnostic
with a stable code and a dotted key path; line and column stay 0 here and
`pgproxy.graph.load` fills them from the source map. The graph is built only
when no diagnostic is an error. Relative file paths (TLS certificates, keys
and CA files) are resolved here against the directory of the config file.

Diagnostic codes (the problem is on the indented line under each code):

    code                               severity  key path
    ---------------------------------  --------  ----------------------------------
    no-listeners                       error     listeners
        the config has no listener, so nothing would be served
    duplicate-listener-address         error     listeners.NAME.address, server.admin
        two sockets bind the same host:port, or 0.0.0.0 (or [::]) and a specific
        address of the same family share a port
    unknown-listener                   error     routes[N].listeners[M]
        a route names a listener that does not exist
    unknown-cluster                    error     routes[N].cluster
        a route names a cluster that does not exist
    duplicate-route-name               error     routes[N].name
        two routes have the same name (default names "routes[N]" count)
    invalid-host                       error     routes[N].host
        no Host header can equal it (a port, a path, a misplaced "*")
    invalid-regex                      error     routes[N].path_regex
        path_regex does not compile as a Python regular expression
    regex-backtracking                 warning   routes[N].path_regex
        path_regex may take exponential time to match, as "(a+)+" does
    invalid-value                      error     routes[N].request_headers.set.NAME
        a header rule names a field that pgproxy writes itself (Host, Via,
        X-Forwarded-*, framing and hop-by-hop fields); also under add and
        remove, and under response_headers
    conflicting-keys                   error     routes[N].response_headers.set.NAME
        a header rule both removes a field and sets or adds it
    redirect-loop                      warning   routes[N].redirect
        the redirect only sets the scheme that every listener of the route
        already has, so the Location is the request's own URL
    shadowed-route                     warning   routes[N]
        the route can never match, because a route ranked before it matches
        every request it matches
    listener-without-routes            warning   listeners.NAME
        no route applies to the listener, so it answers 404 to every request
    empty-cluster                      error     clusters.NAME.endpoints
        the cluster has no endpoint
    duplicate-endpoint                 error     clusters.NAME.endpoints[M]
        the cluster lists the same host:port twice
    missing-hash-key                   error     clusters.NAME.balancer
        consistent_hash without hash_key
    unused-hash-key                    warning   clusters.NAME.hash_key
        hash_key set on a balancer other than consistent_hash
    health-timeout-not-below-interval  error     clusters.NAME.health_check.timeout
        the probe timeout is not below the probe interval
    ejection-time-above-max            warning   clusters.NAME.outlier_detection
        base_ejection_time is above max_ejection_time, which caps every
        ejection, so the base has no effect
    no-health-check                    warning   clusters.NAME
        several endpoints and no active health check
    unused-cluster                     warning   clusters.NAME
        no route sends requests to the cluster
    trusted-proxies-everyone           warning   server.trusted_proxies[M]
        0.0.0.0/0 or ::/0 lets any client forge X-Forwarded-* headers
    admin-not-loopback                 warning   server.admin
        the admin listener, which has no authentication, binds an address
        other than loopback (all interfaces, or a non-loopback IP)
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from types import MappingProxyType

from pgproxy.config.diagnostics import Diagnostic
from pgproxy.config.models import (
    ClusterConfig,
    Config,
    parse_host_port,
    split_endpoint_address,
)
from pgproxy.config.sourcemap import format_key_path
from pgproxy.graph.build_routes import build_route, check_route_names, check_shadowed
from pgproxy.graph.collector import Collector
from pgproxy.graph.routing import RouteTable
from pgproxy.graph.settings import (
    ClusterSettings,
    ListenerSettings,
    ServerSettings,
    settings_from_config,
)
from pgproxy.graph.types import Cluster, Endpoint, Graph, Listener, Route

# Loads the files that the listeners and clusters name and returns a
# diagnostic for each one that fails (`validate --check-files`). It is passed
# in because loading them is the server's code, which the graph cannot import.
FileCheck = Callable[
    [Mapping[str, Listener], Mapping[str, Cluster], str], list[Diagnostic]
]


def build_graph(
    config: Config, source: str, file_check: FileCheck | None = None
) -> tuple[Graph | None, list[Diagnostic]]:
    """Check a Config across its tables and build its Graph.

    `source` is the path of the config file: relative file paths in the
    config are resolved against its directory. `file_check`, when given,
    adds its diagnostics for the files the config names. Returns the Graph
    (None when any diagnostic is an error) and every diagnostic found,
    errors and warnings, in config order.
    """
    found = Collector(source)
    config_dir = _config_dir(source)
    listeners = _build_listeners(config, config_dir, found)
    clusters = _build_clusters(config, config_dir, found)
    if file_check is not None:
        found.items.extend(file_check(listeners, clusters, source))
    routes = [
        build_route(config, i, route, found) for i, route in enumerate(config.routes)
    ]
    check_route_names(routes, found)
    check_shadowed(routes, found)
    _check_usage(config, routes, found)
    if found.has_errors:
        return None, found.items
    graph = Graph(
        server=settings_from_config(ServerSettings, config.server),
        source=source,
        listeners=MappingProxyType(listeners),
        clusters=MappingProxyType(clusters),
        routes=tuple(routes),
        router=RouteTable(routes),
    )
    return graph, found.items


def _config_dir(source: str) -> str:
    """Return the absolute directory of the config file at path `source`."""
    if os.path.isabs(source):
        return os.path.dirname(source)
    # Not os.path.abspath: its lexical ".." removal can name another file
    # than the kernel opened when a directory on the way is a symbolic link.
    return os.path.dirname(os.path.join(os.getcwd(), source))


def _build_listeners(
    config: Config, config_dir: str, found: Collector
) -> dict[str, Listener]:
    if not config.listeners:
        found.error(
            "listeners",
            "no-listeners",
            "no listener is configured, so nothing would be served",
            'add a [listeners.NAME] table with an address such as "0.0.0.0:8080"',
        )
    listeners = {}
    bound: list[tuple[str, str, int]] = []
    if config.server.admin is not None:
        host, port = parse_host_port(config.server.admin)
        bound.append(("server.admin", host, port))
    for name, listener_config in config.listeners.items():
        host, port = parse_host_port(listener_config.address)
        settings = settings_from_config(ListenerSettings, listener_config, config_dir)
        listeners[name] = Listener(name, host, port, settings)
        bound.append((format_key_path(("listeners", name, "address")), host, port))
    _check_addresses(bound, found)
    _check_trusted_proxies(config, found)
    _check_admin_address(config, found)
    return listeners


def _check_admin_address(config: Config, found: Collector) -> None:
    if config.server.admin is None:
        return
    host, port = parse_host_port(config.server.admin)
    if not admin_beyond_loopback(host):
        return
    found.warning(
        "server.admin",
        "admin-not-loopback",
        f"the admin listener on {_show(host, port)} has no authentication, and "
        "this address is reachable from other hosts: anyone who can connect "
        "reads /status and /metrics",
        'bind it to loopback ("127.0.0.1:9901" or "[::1]:9901") and reach it '
        "through an SSH tunnel or a local agent",
    )


def admin_beyond_loopback(host: str) -> bool:
    """Return whether an admin host is all interfaces or a non-loopback IP.

    A host name other than "localhost" is not resolved here, so it is not
    reported.
    """
    if host in ("", "*"):
        return True
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_addresses(bound: list[tuple[str, str, int]], found: Collector) -> None:
    for i, (key, host, port) in enumerate(bound):
        for other_key, other_host, other_port in bound[:i]:
            # Port 0 asks the OS for a free port, so two of them never clash.
            if port == 0 or port != other_port:
                continue
            if _addresses_overlap(host, other_host):
                found.error(
                    key,
                    "duplicate-listener-address",
                    f"address {_show(host, port)} overlaps {other_key} "
                    f"({_show(other_host, other_port)}); the second bind would fail",
                )
                break


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _addresses_overlap(first: str, second: str) -> bool:
    try:
        a, b = ipaddress.ip_address(first), ipaddress.ip_address(second)
    except ValueError:
        return first.lower() == second.lower()
    if a.version != b.version:
        # pgproxy binds IPv6 sockets with IPV6_V6ONLY, so [::] and 0.0.0.0 coexist.
        return False
    return a == b or a.is_unspecified or b.is_unspecified


def _check_trusted_proxies(config: Config, found: Collector) -> None:
    for i, network in enumerate(config.server.trusted_proxies):
        if network.prefixlen == 0:
            found.warning(
                f"server.trusted_proxies[{i}]",
                "trusted-proxies-everyone",
                f"{network} trusts every client, so any client can forge "
                "X-Forwarded-For, X-Forwarded-Proto and X-Forwarded-Host",
                "list only the addresses of your own proxies",
            )


def _build_clusters(
    config: Config, config_dir: str, found: Collector
) -> dict[str, Cluster]:
    clusters = {}
    for name, cluster_config in config.clusters.items():
        endpoints = _build_endpoints(name, cluster_config, found)
        _check_cluster(name, cluster_config, found)
        settings = settings_from_config(ClusterSettings, cluster_config, config_dir)
        clusters[name] = Cluster(name, tuple(endpoints), settings)
    return clusters


def _build_endpoints(
    name: str, cluster_config: ClusterConfig, found: Collector
) -> list[Endpoint]:
    key = format_key_path(("clusters", name, "endpoints"))
    if not cluster_config.endpoints:
        found.error(key, "empty-cluster", f"cluster {name} has no endpoints")
    endpoints = []
    seen: dict[tuple[str, int], str] = {}
    for i, endpoint_config in enumerate(cluster_config.endpoint_configs()):
        tls, host, port = split_endpoint_address(endpoint_config.address)
        identity = (host.lower(), port)
        if identity in seen:
            found.error(
                f"{key}[{i}]",
                "duplicate-endpoint",
                f'endpoint "{endpoint_config.address}" repeats "{seen[identity]}" '
                f"in cluster {name}",
                "give the endpoint a weight instead of listing it twice",
            )
            continue
        seen[identity] = endpoint_config.address
        endpoints.append(
            Endpoint(
                endpoint_config.address, host, port, tls, endpoint_config.weight, name
            )
        )
    return endpoints


def _check_cluster(name: str, cluster_config: ClusterConfig, found: Collector) -> None:
    key = format_key_path(("clusters", name))
    balancer = cluster_config.balancer
    if balancer == "consistent_hash" and cluster_config.hash_key is None:
        found.error(
            f"{key}.balancer",
            "missing-hash-key",
            "consistent_hash needs hash_key",
            'set hash_key to "header:NAME", "cookie:NAME", "query:NAME", "path" '
            'or "client_ip"',
        )
    elif balancer != "consistent_hash" and cluster_config.hash_key is not None:
        found.warning(
            f"{key}.hash_key",
            "unused-hash-key",
            f"hash_key has no effect with balancer {balancer}",
            'remove it, or set balancer = "consistent_hash"',
        )
    check = cluster_config.health_check
    if check is not None and check.timeout >= check.interval:
        found.error(
            f"{key}.health_check.timeout",
            "health-timeout-not-below-interval",
            f"health check timeout ({check.timeout:g}s) must be below its interval "
            f"({check.interval:g}s), or probes would overlap",
        )
    outlier = cluster_config.outlier_detection
    if outlier.base_ejection_time > outlier.max_ejection_time:
        found.warning(
            f"{key}.outlier_detection.base_ejection_time",
            "ejection-time-above-max",
            f"base_ejection_time ({outlier.base_ejection_time:g}s) is above "
            f"max_ejection_time ({outlier.max_ejection_time:g}s), so every "
            "ejection lasts max_ejection_time",
            "raise max_ejection_time, or lower base_ejection_time",
        )
    if check is None and len(cluster_config.endpoints) > 1:
        found.warning(
            key,
            "no-health-check",
            f"cluster {name} has {len(cluster_config.endpoints)} endpoints and no "
            "health check, so a dead endpoint keeps receiving requests until "
            "outlier detection ejects it",
            "add a [clusters.NAME.health_check] table",
        )


def _check_usage(config: Config, routes: list[Route], found: Collector) -> None:
    used_clusters = {route.cluster for route in routes}
    for name in config.clusters:
        if name not in used_clusters:
            found.warning(
                format_key_path(("clusters", name)),
                "unused-cluster",
                f"no route sends requests to cluster {name}",
            )
    routed = set().union(*(route.listeners for route in routes)) if routes else set()
    for name in config.listeners:
        if name not in routed:
            found.warning(
                format_key_path(("listeners", name)),
                "listener-without-routes",
                f"no route applies to listener {name}, so it answers 404 to every "
                "request",
            )
