"""The proxy service: state shared by every downstream connection of a process.

`ProxyService.current` is the RuntimeGraph that new requests use. A reload
replaces it whole with `swap`; an exchange keeps the RuntimeGraph it started
with until it ends, so in-flight requests finish on their graph. Pools and
the health table belong to the service, not to a graph, so they carry over.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from pgproxy.balancing import Balancer, HashKey, build_balancer
from pgproxy.graph.paths import AmbiguousPathRule, encode_path
from pgproxy.graph.types import Cluster, Graph, Listener
from pgproxy.health.state import HealthTable
from pgproxy.observability.access import AccessLog
from pgproxy.observability.metrics import ListenerMetrics, Metrics
from pgproxy.proxy.fdlimit import RESERVED_DESCRIPTORS, connection_cap, open_file_limit
from pgproxy.proxy.header_rules import HeaderRules
from pgproxy.proxy.pool import EndpointPool, Pools
from pgproxy.proxy.respond import FixedResponse, Redirect

if TYPE_CHECKING:
    from pgproxy.proxy.exchange import Exchange

logger = logging.getLogger(__name__)

# Seconds between warnings about closed connections, so that a flood of
# connections cannot flood the log.
LIMIT_WARNING_INTERVAL: Final = 10.0


class ClientConnection(Protocol):
    """A client connection that counts against the connection limits.

    A DownstreamProtocol, or a TlsHandshake while its TLS handshake runs.
    """

    listener_name: str

    @property
    def tunnel(self) -> Exchange | None: ...

    def drain(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def reset(self) -> None: ...

    def cancel(self, flag: str) -> None: ...


class ClusterRuntime:
    """A cluster with its balancer, pools and Host header policy."""

    __slots__ = (
        "balancer",
        "cluster",
        "hash_key",
        "host_literal",
        "hosts",
        "limited",
        "name",
        "pools",
        "settings",
    )

    def __init__(self, cluster: Cluster, pools: Pools) -> None:
        self.cluster = cluster
        self.name = cluster.name
        self.settings = cluster.settings
        self.balancer: Balancer = build_balancer(cluster)
        # Parsed once per graph load, and only for consistent_hash, the one
        # balancer that reads a key.
        self.hash_key: HashKey | None = None
        spec = self.settings.hash_key
        if spec is not None and self.settings.balancer == "consistent_hash":
            self.hash_key = HashKey(spec)
        self.pools: dict[str, EndpointPool] = {}
        self.hosts: dict[str, bytes] = {}
        # Whether pick() must look at each endpoint's connection count.
        self.limited = self.settings.max_connections is not None
        for endpoint in cluster.endpoints:
            pool = pools.get(
                endpoint,
                self.settings.pool_idle_timeout,
                self.settings.max_idle_connections,
            )
            pool.idle_timeout = self.settings.pool_idle_timeout
            pool.max_idle = self.settings.max_idle_connections
            pool.max_response_head = self.settings.max_response_header_bytes
            pool.tls_ca_file = self.settings.tls_ca_file
            pool.max_active = self.settings.max_connections or 0
            if pool.waiting:
                pool.wake()  # the limit may have been raised or removed
            self.pools[endpoint.address] = pool
            host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
            self.hosts[endpoint.address] = f"{host}:{endpoint.port}".encode("idna")
        policy = self.settings.host_header
        self.host_literal: bytes | None = (
            None if policy in ("preserve", "endpoint") else policy.encode("idna")
        )

    def __repr__(self) -> str:
        return f"<ClusterRuntime {self.name} endpoints={len(self.pools)}>"


class RuntimeGraph:
    """A Graph plus what the data plane derives from it once per load."""

    def __init__(self, graph: Graph, pools: Pools) -> None:
        self.graph = graph
        self.clusters = {
            name: ClusterRuntime(cluster, pools)
            for name, cluster in graph.clusters.items()
        }
        self.fixed: dict[int, FixedResponse] = {}
        self.strip: dict[int, bytes] = {}
        # Header rules by route index; empty when no route has any, which
        # is all the request path checks then.
        self.request_rules: dict[int, HeaderRules] = {}
        self.response_rules: dict[int, HeaderRules] = {}
        self.redirects: dict[int, Redirect] = {}
        for route in graph.routes:
            if route.redirect is not None:
                self.redirects[route.index] = Redirect(route.redirect)
            if route.request_headers is not None:
                self.request_rules[route.index] = HeaderRules(route.request_headers)
            if route.response_headers is not None:
                self.response_rules[route.index] = HeaderRules(route.response_headers)
            if route.respond is not None:
                self.fixed[route.index] = FixedResponse(route.respond)
            if route.strip_prefix and route.path_kind == "prefix":
                # Encoded as `strip_routed_prefix` encodes a normalised path.
                self.strip[route.index] = encode_path(route.path).encode("ascii")
        self.trusted_proxies = tuple(graph.server.trusted_proxies)
        # Only listeners that reject a spelling, so that with none an exchange
        # pays one truth test. Read per request, not per connection: a reload
        # that adds a spelling covers open keep-alive connections too.
        self.path_rules = {
            name: AmbiguousPathRule(listener.settings.reject_ambiguous_paths)
            for name, listener in graph.listeners.items()
            if listener.settings.reject_ambiguous_paths
        }
        # Metrics bound to this graph, by listener name; None without metrics.
        self.metrics: dict[str, ListenerMetrics] | None = None

    def __repr__(self) -> str:
        routes = len(self.graph.routes)
        return f"<RuntimeGraph clusters={len(self.clusters)} routes={routes}>"


class ProxyService:
    """Current graph, pools, health table, access log and open connections."""

    def __init__(self, graph: Graph, health: HealthTable, access: AccessLog) -> None:
        self.pools = Pools()
        self.current = RuntimeGraph(graph, self.pools)
        self.health = health
        self.access = access
        self.connections: set[ClientConnection] = set()
        self.open_by_listener: dict[str, int] = {}
        # Client connections this process keeps open at most, within its
        # open file limit (pgproxy.proxy.fdlimit); None for no cap.
        self.file_limit = open_file_limit()
        self.max_open = connection_cap(self.file_limit)
        self.rejected_since_warning = 0
        self._warned_at = -LIMIT_WARNING_INTERVAL
        self.draining = False
        self.on_empty: Callable[[], None] | None = None
        self.metrics: Metrics | None = None  # set when a process serves /metrics

    def __repr__(self) -> str:
        return (
            f"<ProxyService connections={len(self.connections)} max={self.max_open} "
            f"draining={self.draining} pools={self.pools!r}>"
        )

    def swap(self, graph: Graph) -> None:
        """Make `graph` the one new requests use; in-flight ones keep theirs."""
        self.current = RuntimeGraph(graph, self.pools)

    def protocol_factory(
        self, listener: Listener, tls: ssl.SSLContext | None = None
    ) -> Callable[[], asyncio.Protocol]:
        """Return the protocol factory for `loop.create_server` on one listener.

        With `tls`, the server must be created without `ssl=`: each
        connection runs its handshake in a TlsHandshake, which counts it
        against the connection limits from the accept on.
        """
        from pgproxy.proxy.downstream import DownstreamProtocol
        from pgproxy.proxy.tls_accept import TlsHandshake

        name = listener.name
        # The loop that serves the listener, taken at its first connection.
        loops: list[asyncio.AbstractEventLoop] = []

        def factory() -> asyncio.Protocol:
            # A reload may change a kept listener's limits; new connections
            # take them from the graph in force.
            current = self.current.graph.listeners.get(name, listener)
            if not loops:
                loops.append(asyncio.get_running_loop())
            downstream = DownstreamProtocol(self, current, loops[0])
            if tls is None:
                return downstream
            return TlsHandshake(self, downstream, tls)

        return factory

    def start_draining(self) -> None:
        """Close idle client connections and let busy ones close after their reply."""
        self.draining = True
        for conn in list(self.connections):
            conn.drain()

    def abort_all(self, flag: str) -> int:
        """Reset every remaining client connection; return how many there were.

        Their exchanges in progress are logged with the failure flag `flag`
        (`drain_timeout` or `drain_cancelled`). A reset, not a FIN, because
        a connection still open after the drain is usually mid-response, and
        an HTTP/1.0 client reading its body until the close would take a FIN
        for the end of the body.
        """
        remaining = list(self.connections)
        for conn in remaining:
            conn.cancel(flag)
        return len(remaining)

    async def wait_closed(self) -> None:
        """Wait until every client connection has closed."""
        while self.connections:
            closed = asyncio.Event()
            self.on_empty = closed.set
            await closed.wait()

    def admit(self, conn: ClientConnection, max_connections: int | None) -> bool:
        """Record a new client connection; return False if it exceeds a limit.

        `max_connections` is the listener's own limit. A connection that
        exceeds it or the process's cap is still recorded, until `forget`.
        """
        self.connections.add(conn)
        name = conn.listener_name
        count = self.open_by_listener.get(name, 0) + 1
        self.open_by_listener[name] = count
        if max_connections is not None and count > max_connections:
            self._warn_rejected(
                name, count - 1, f"the listener's max_connections = {max_connections}"
            )
            return False
        cap = self.max_open
        if cap is not None and len(self.connections) > cap:
            limit = (
                f"{cap} for this process, half of its open file limit "
                f"({self.file_limit}) less {RESERVED_DESCRIPTORS} reserved; raise "
                "the limit (ulimit -n, systemd's LimitNOFILE) to serve more"
            )
            self._warn_rejected(name, len(self.connections) - 1, limit)
            return False
        return True

    def _warn_rejected(self, listener: str, open_now: int, limit: str) -> None:
        self.rejected_since_warning += 1
        now = time.monotonic()
        if now - self._warned_at < LIMIT_WARNING_INTERVAL:
            return
        logger.warning(
            'closing new client connections on listener "%s": %d open, at %s '
            "(%d closed on all listeners since the last warning)",
            listener,
            open_now,
            limit,
            self.rejected_since_warning,
        )
        self._warned_at = now
        self.rejected_since_warning = 0

    def forget(self, conn: ClientConnection) -> None:
        """Remove a closed client connection; wake `wait_closed` when none is left."""
        if conn in self.connections:
            self.connections.remove(conn)
            name = conn.listener_name
            self.open_by_listener[name] = self.open_by_listener.get(name, 1) - 1
        if not self.connections and self.on_empty is not None:
            on_empty, self.on_empty = self.on_empty, None
            on_empty()
