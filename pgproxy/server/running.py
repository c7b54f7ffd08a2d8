"""The running data plane of one process, as reloads and metrics use it.

`ServiceState` implements `pgproxy.server.reload.RunningState` over the
proxy service: it opens and closes listeners, swaps the graph and health
table in one synchronous step, drains what a reload removed, and reads the
endpoint gauges for /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pgproxy.graph.types import Graph, Listener, LoadedGraph
from pgproxy.health.state import HealthTable
from pgproxy.observability.metrics import EndpointReading, Metrics
from pgproxy.proxy.exchange import Exchange
from pgproxy.proxy.service import ProxyService
from pgproxy.server.listeners import (
    BindError,
    BoundListener,
    load_certificate,
    server_ssl_context,
)
from pgproxy.server.reload import ReloadPlan

logger = logging.getLogger(__name__)

BindListener = Callable[[Listener], BoundListener]


@dataclass
class ServiceState:
    """The proxy service with its listeners, for reloads and metrics.

    `bind` returns a bound socket for a listener: a fresh bind in a single
    process, or the socket the supervisor sent to a worker.
    """

    service: ProxyService
    metrics: Metrics
    bind: BindListener
    servers: dict[str, asyncio.Server] = field(default_factory=dict)
    # The TLS context each TLS listener's server uses, by listener name.
    contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)
    on_install: list[Callable[[Graph, HealthTable], None]] = field(default_factory=list)
    # Servers and TLS contexts opened by open_listeners, registered by install.
    _pending: list[tuple[str, asyncio.Server, ssl.SSLContext | None]] = field(
        default_factory=list, init=False, repr=False
    )
    # Kept TLS listeners whose files check_certificates loaded, for install.
    _renewals: list[Listener] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.metrics.set_endpoint_source(self.endpoint_readings)

    @property
    def graph(self) -> Graph:
        """The graph new requests use."""
        return self.service.current.graph

    @property
    def health(self) -> HealthTable:
        """The health table of the graph in force."""
        return self.service.health

    def check_certificates(self, listeners: tuple[Listener, ...]) -> None:
        """Load the TLS files of kept `listeners` into throwaway contexts.

        Raises BindError when one cannot be loaded, so a reload with a missing
        or broken file keeps the certificates in use.
        """
        for listener in listeners:
            server_ssl_context(listener)
        self._renewals = [item for item in listeners if item.name in self.contexts]

    async def open_listeners(self, listeners: tuple[Listener, ...]) -> None:
        """Bind and serve `listeners`; on failure close the ones opened here."""
        loop = asyncio.get_running_loop()
        opened: list[tuple[str, asyncio.Server, ssl.SSLContext | None]] = []
        try:
            for listener in listeners:
                bound = self._bind_or_reuse(listener)
                server = await loop.create_server(
                    # TLS runs in the protocol, so handshakes count too.
                    self.service.protocol_factory(listener, bound.ssl_context),
                    sock=bound.sock,
                )
                opened.append((listener.name, server, bound.ssl_context))
                logger.info(
                    'listener "%s" listening on %s', listener.name, bound.describe()
                )
        except BaseException:
            for _, server, _ in opened:
                server.close()
            raise
        self._pending = opened

    def _bind_or_reuse(self, listener: Listener) -> BoundListener:
        try:
            return self.bind(listener)
        except (OSError, BindError):
            reused = self._reuse(listener)
            if reused is None:
                raise
            return reused

    def _reuse(self, listener: Listener) -> BoundListener | None:
        """Share the socket of a listener whose address stays (its TLS changed).

        Binding the address again would fail while the old socket is open.
        """
        old = self.graph.listeners.get(listener.name)
        server = self.servers.get(listener.name)
        if old is None or server is None or not server.sockets:
            return None
        if old.settings.address != listener.settings.address:
            return None
        sock = socket.socket(fileno=os.dup(server.sockets[0].fileno()))
        return BoundListener(listener, sock, server_ssl_context(listener))

    def install(
        self, loaded: LoadedGraph, health: HealthTable, plan: ReloadPlan
    ) -> None:
        """Swap graph and health table without an await, so no request gets half."""
        for name in plan.removed_listeners:
            self.contexts.pop(name, None)
            server = self.servers.pop(name, None)
            if server is not None:
                server.close()
        for name, server, context in self._pending:
            self.servers[name] = server
            if context is not None:
                self.contexts[name] = context
        self._pending = []
        self._renew_certificates()
        self.service.health = health
        self.service.swap(loaded.graph)
        for callback in self.on_install:
            callback(loaded.graph, health)

    def _renew_certificates(self) -> None:
        # A context that loads a chain again uses it for new handshakes; the
        # connections already open keep theirs.
        renewals, self._renewals = self._renewals, []
        for listener in renewals:
            tls = listener.settings.tls
            context = self.contexts.get(listener.name)
            if tls is None or context is None:
                continue
            try:
                load_certificate(context, tls)
            except (OSError, ssl.SSLError) as exc:
                # NOTE: this happens only if the files changed again after
                # check_certificates read them; OpenSSL may then keep the new
                # chain with the old key.
                logger.error(
                    'listener "%s": cannot load TLS certificate "%s" or key "%s" '
                    "again: %s",
                    listener.name,
                    tls.certificate,
                    tls.private_key,
                    exc,
                )

    def retire(self, plan: ReloadPlan) -> None:
        """Drain what the new graph dropped: listeners, pools and tunnels."""
        removed = set(plan.removed_listeners)
        tunnels = 0
        for conn in list(self.service.connections):
            if conn.listener_name in removed:
                conn.drain()
            tunnel = conn.tunnel
            if tunnel is not None and not _tunnel_survives(tunnel, plan):
                conn.close()
                tunnels += 1
        closed = sum(
            self.service.pools.retire(cluster, address)
            for cluster, address in plan.removed_endpoints
        )
        if closed or tunnels:
            logger.info(
                "reload closed %d idle upstream connections to removed endpoints "
                "and %d upgraded connections whose route changed",
                closed,
                tunnels,
            )

    def endpoint_readings(self) -> Iterator[EndpointReading]:
        """Yield health and pool gauges of every endpoint of the graph in force."""
        health = self.service.health
        for cluster in self.service.current.clusters.values():
            for endpoint in cluster.cluster.endpoints:
                pool = cluster.pools[endpoint.address]
                yield EndpointReading(
                    cluster.name,
                    endpoint.address,
                    1.0 if health.is_available(endpoint) else 0.0,
                    pool.idle,
                    pool.active,
                    pool.waiting,
                )


def _tunnel_survives(tunnel: Exchange, plan: ReloadPlan) -> bool:
    route, cluster, endpoint = tunnel.route, tunnel.cluster, tunnel.endpoint
    if route is None or cluster is None or endpoint is None:
        return False
    return plan.tunnel_survives(route.name, cluster.name, endpoint.address)
