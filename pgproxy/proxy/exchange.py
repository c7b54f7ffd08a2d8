"""One request through the proxy: route, pick, connect, forward, respond, log.

The downstream connection creates an Exchange once a request head has been
parsed and passed the framing checks, so a malformed request never reaches
this module. Everything here runs in event-loop callbacks; the only task is
the one opening a new upstream connection on a pool miss. The response
relay and the Upgrade tunnel are in pgproxy/proxy/relay.py, failures and
deadlines in pgproxy/proxy/failures.py, the fields in exchange_state.py.

Invariants:
- The log phase runs exactly once per exchange, whatever ends it.
- A retry goes to an endpoint not tried yet, and only when it is safe: no
  byte of the request reached the upstream (connect failure), or the route
  opts in ("reset-before-response", or 502/503/504 for an idempotent
  request or one with Idempotency-Key), and every body byte is still held
  for replay. The route timeout covers every attempt.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from pgproxy.errors import NoEndpointError, UpstreamError
from pgproxy.graph.paths import AmbiguousPathRule, InvalidPathError, normalize_path
from pgproxy.graph.routing import RouteTable
from pgproxy.graph.types import Endpoint
from pgproxy.observability.access import AccessRecord
from pgproxy.proxy.headers import HeaderMap, build_request_head, strip_routed_prefix
from pgproxy.proxy.pool import EndpointPool
from pgproxy.proxy.relay import LAST_CHUNK, ResponseRelay
from pgproxy.proxy.respond import Redirect
from pgproxy.proxy.upstream import UpstreamConnection

logger = logging.getLogger(__name__)

# Request body bytes held for a possible retry; a larger body is streamed once.
REPLAY_LIMIT: Final = 64 * 1024
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# A Final static: a name imported with `from time import` is a dict lookup in
# the module's globals on each call from compiled code.
_monotonic: Final = time.monotonic


class Exchange(ResponseRelay):
    """One request and its response, from the parsed head to the access log."""

    __slots__ = ()

    # route and pick

    def start(self) -> None:
        """Route the request and start the first attempt (or reply directly)."""
        info = self.info
        target = info.target
        path, _, query = target.decode("latin-1").partition("?")
        rules = self.runtime.path_rules
        if rules:
            rule = rules.get(self.downstream.listener_name)
            if rule is not None and rule.search(path) is not None:
                self.reject_path(rule, path)
                return
        if "%" in path or "/." in path or "//" in path:
            try:
                path = normalize_path(path)
            except InvalidPathError:
                self.respond_error(400, "invalid percent-encoding in the request path")
                return
        headers = HeaderMap(self.headers)
        graph = self.runtime.graph
        router = graph.router
        method = self.method.decode("ascii")
        listener = self.downstream.listener_name
        # A RouteTable is called directly: through Graph.match and the Router
        # protocol, compiled code makes a generic Python call.
        if isinstance(router, RouteTable):
            route = router.match(listener, method, info.host, path, headers)
        else:
            route = graph.match(listener, method, info.host, path, headers)
        self.route = route
        if route is None:
            self.respond_error(404, "no route matches this request")
            return
        fixed = self.runtime.fixed.get(route.index)
        if fixed is not None:
            self.status = fixed.status
            self.written = True
            self.bytes_out = 0 if self.method == b"HEAD" else len(fixed.body)
            close = not self.request_complete or not self.client_keep_alive
            self.client_keep_alive = not close
            self.downstream.write(
                fixed.render(close=close, head_only=self.method == b"HEAD")
            )
            self.finish()
            return
        if self.runtime.redirects:
            redirect = self.runtime.redirects.get(route.index)
            if redirect is not None:
                self.send_redirect(redirect)
                return
        assert route.cluster is not None
        cluster = self.runtime.clusters[route.cluster]
        self.cluster = cluster
        key = None
        hash_key = cluster.hash_key
        if hash_key is not None:
            key = hash_key.value(headers, path, query, self.downstream.client_ip)
        self.candidates = cluster.balancer.candidates(key)
        self.set_deadline(self.downstream.clock() + route.timeout)
        self.next_attempt()

    def send_redirect(self, redirect: Redirect) -> None:
        """Send the route's redirect, or 400 when the request has no host."""
        info = self.info
        location = redirect.location(
            self.downstream.forwarding.proto, info.host_raw, info.target
        )
        if location is None:
            self.respond_error(400, "a redirect needs the request's Host header")
            return
        self.status = redirect.status
        self.written = True
        self.bytes_out = 0
        close = not self.request_complete or not self.client_keep_alive
        self.client_keep_alive = not close
        self.downstream.write(redirect.render(location, close=close))
        self.finish()

    def reject_path(self, rule: AmbiguousPathRule, path: str) -> None:
        """Respond 400 to a path with a spelling that the listener rejects."""
        found = rule.find(path)
        assert found is not None
        name, text = found
        logger.debug(
            "rejecting request from %s with 400: the path contains %r (%s), "
            "which listener %s rejects",
            self.downstream.client,
            text,
            name,
            self.downstream.listener_name,
        )
        self.respond_error(
            400,
            f'ambiguous request path: it contains "{text}"',
            flag="ambiguous_path",
        )

    def pick(self) -> Endpoint | None:
        """Return the next endpoint to try: untried and available, in balancer order.

        With max_connections, an endpoint at its limit is passed over while
        another is free. When none is, the first one passed over is
        returned, and try_endpoint waits for one of its connections.
        """
        cluster = self.cluster
        assert cluster is not None and self.candidates is not None
        health = self.downstream.service.health
        ignore_health = (
            cluster.settings.when_all_unhealthy == "route_to_all"
            and health.all_unavailable(cluster.name)
        )
        limited = cluster.limited
        for endpoint in self.candidates:
            if ignore_health or health.is_available(endpoint):
                if limited and cluster.pools[endpoint.address].full():
                    if self.deferred is None:
                        self.deferred = []
                    self.deferred.append(endpoint)
                    continue
                return endpoint
        if self.deferred:
            return self._pick_deferred(ignore_health)
        return None

    def _pick_deferred(self, ignore_health: bool) -> Endpoint | None:
        """Return the first passed-over endpoint that is free, else the first one."""
        assert self.cluster is not None and self.deferred is not None
        health = self.downstream.service.health
        deferred = self.deferred = [
            endpoint
            for endpoint in self.deferred
            if ignore_health or health.is_available(endpoint)
        ]
        for i, endpoint in enumerate(deferred):
            if not self.cluster.pools[endpoint.address].full():
                return deferred.pop(i)
        return deferred.pop(0) if deferred else None

    def next_attempt(self) -> None:
        """Try the next endpoint: a pooled connection at once, or connect."""
        endpoint = self.pick()
        if endpoint is None:
            error = self.last_error or NoEndpointError(
                f'no endpoint of cluster "{self.cluster_name}" is available'
            )
            self.fail(error)
            return
        self.try_endpoint(endpoint)

    def try_endpoint(self, endpoint: Endpoint) -> None:
        """Send the request to `endpoint`, which `pick` returned."""
        assert self.cluster is not None
        self.endpoint = endpoint
        self.attempts += 1
        pool = self.cluster.pools[endpoint.address]
        self.pool = pool
        if not (self.cluster.limited and pool.full()):
            conn = pool.acquire()
            if conn is not None:
                self.attach(conn)
                return
        self.open_upstream(pool, fresh=False)

    def open_upstream(self, pool: EndpointPool, *, fresh: bool) -> None:
        """Start a task that opens a new connection, or waits for a slot first.

        After a slot frees up, an idle connection is used when there is one,
        unless `fresh` is set.
        """
        assert self.cluster is not None
        loop = self.downstream.loop
        if self.cluster.limited and pool.full():
            task = self.connect_when_free(pool, fresh)
            self.connect_task = loop.create_task(task)
            return
        pool.begin_connect()
        self.connect_unstarted = True
        self.connect_task = loop.create_task(self.connect(pool))

    async def connect_when_free(self, pool: EndpointPool, fresh: bool) -> None:
        """Wait for a connection slot of the endpoint, then forward on it.

        The wait is bounded by connect_timeout, and so is the connect after it.
        """
        assert self.cluster is not None
        try:
            await pool.wait_for_slot(self.cluster.settings.connect_timeout)
        except UpstreamError as error:
            self.connect_task = None
            if not self.done:
                self.on_upstream_failed(error)
            return
        # The reserved slot is taken below, before anything else runs.
        pool.end_reservation()
        conn = pool.acquire()
        if conn is not None and fresh:
            # The idle connection closes in place of the new one, so the
            # upstream never has more than max_connections open.
            pool.close_acquired(conn)
            conn = None
        if conn is None:
            pool.begin_connect()
            await self.connect(pool)
            return
        self.connect_task = None
        self.attach(conn)

    async def connect(self, pool: EndpointPool) -> None:
        """Open a new connection to the picked endpoint, then forward on it.

        The caller has counted the connection with `pool.begin_connect`.
        """
        assert self.cluster is not None
        # pool.connect counts the connection down from here on.
        self.connect_unstarted = False
        try:
            conn = await pool.connect(self.cluster.settings.connect_timeout)
        except UpstreamError as error:
            self.connect_task = None
            if not self.done:
                self.on_upstream_failed(error)
            return
        self.connect_task = None
        if self.done:
            pool.release(conn)
            return
        self.attach(conn)

    # forward

    def attach(self, conn: UpstreamConnection) -> None:
        """Send the request head and every body byte received so far on `conn`."""
        assert self.cluster is not None and self.endpoint is not None
        self.upstream = conn
        conn.start(self, self.method == b"HEAD")
        self.cluster.balancer.on_request_start(self.endpoint)
        if not self.upstream_head:
            self.upstream_head = self.build_upstream_head()
        if not self.body_chunks and not (self.info.chunked and self.request_complete):
            conn.send(self.upstream_head)
        else:
            # Written as separate buffers: joining them would copy the body.
            parts = [self.upstream_head]
            if self.info.chunked:
                for chunk in self.body_chunks:
                    parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
                if self.request_complete:
                    parts.append(LAST_CHUNK)
            else:
                parts += self.body_chunks
            conn.send_parts(parts)
        if self.request_complete:
            self.arm_head_timeout()
        else:
            if self.info.expect_continue and not self.sent_continue and not self.http10:
                self.sent_continue = True
                self.downstream.write(_CONTINUE)
            self.downstream.resume_body()

    def build_upstream_head(self) -> bytes:
        """Build the request head for the cluster's Host policy and route."""
        cluster = self.cluster
        assert (
            cluster is not None and self.endpoint is not None and self.route is not None
        )
        info = self.info
        if cluster.host_literal is not None:
            host = cluster.host_literal
        elif cluster.settings.host_header == "endpoint" or not info.host_raw:
            host = cluster.hosts[self.endpoint.address]
        else:
            host = info.host_raw
        target = info.target
        prefix = self.runtime.strip.get(self.route.index)
        if prefix is not None:
            target = strip_routed_prefix(target, prefix)
        head = build_request_head(
            self.method,
            target,
            self.headers,
            info,
            host,
            self.downstream.forwarding,
            self.header_names,
        )
        if self.runtime.request_rules:
            rules = self.runtime.request_rules.get(self.route.index)
            if rules is not None:
                head = rules.apply(head)
        return head

    def on_request_body(self, chunk: bytes) -> None:
        """Forward a body chunk from the client, or hold it until connected."""
        self.bytes_in += len(chunk)
        if self.replayable:
            self.body_chunks.append(chunk)
            self.body_held += len(chunk)
        conn = self.upstream
        if conn is not None:
            if self.info.chunked:
                conn.send_parts((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                conn.send(chunk)
        elif self.body_held > REPLAY_LIMIT:
            self.downstream.pause_body()
        if self.body_held > REPLAY_LIMIT and conn is not None:
            self.replayable = False
            self.body_chunks = []
            self.body_held = 0

    def on_request_complete(self) -> None:
        """Record the end of the request body and finish its framing upstream."""
        self.request_complete = True
        conn = self.upstream
        if conn is not None and not self.tunnel:
            if self.info.chunked:
                conn.send(LAST_CHUNK)
            self.arm_head_timeout()

    def arm_head_timeout(self) -> None:
        """Start the response header timeout once the request is fully sent."""
        assert self.cluster is not None
        at = self.downstream.clock() + self.cluster.settings.response_header_timeout
        self.head_deadline = at
        self.downstream.watch_deadline(at)

    def set_deadline(self, at: float) -> None:
        """Set the route deadline, covering every attempt."""
        self.deadline = at
        self.downstream.watch_deadline(at)

    def next_deadline(self) -> float:
        """Return the earliest pending deadline of this exchange, or 0."""
        if self.head_deadline and (
            not self.deadline or self.head_deadline < self.deadline
        ):
            return self.head_deadline
        return self.deadline

    # backpressure

    def pause_request_body(self) -> None:
        """Stop reading the client while the upstream write buffer is full."""
        self.downstream.pause_body()

    def resume_request_body(self) -> None:
        """Read the client again."""
        self.downstream.resume_body()

    # log

    def finish(self) -> None:
        """Run the log phase and hand the connection to the next request."""
        if self.done:
            return
        self.done = True
        if self.connect_task is not None:
            self.cancel_connect()
        metrics = self.runtime.metrics
        listener = metrics.get(self.downstream.listener_name) if metrics else None
        if listener is not None:
            route = self.route
            stats = (
                listener.unrouted
                if route is None
                else listener.routes.get(route.index, listener.unrouted)
            )
            stats.observe(self.status, _monotonic() - self.started, self.attempts)
        access = self.downstream.service.access
        if access.enabled:
            access.write(self.access_record(combined=access.combined))
        self.downstream.exchange_done(self)

    def access_record(self, *, combined: bool = True) -> AccessRecord:
        """Build the access record of this exchange.

        Referer and User-Agent are looked up only for the combined format,
        the only one that writes them.
        """
        route = self.route
        record = AccessRecord(
            time=self.wall_started,
            client=self.downstream.client,
            listener=self.downstream.listener_name,
            method=self.method.decode("ascii"),
            path=self.info.target.decode("latin-1"),
            status=self.status,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration_ms=(_monotonic() - self.started) * 1000,
            route=route.name if route is not None else None,
            cluster=self.cluster_name,
            endpoint=self.endpoint.address if self.endpoint is not None else None,
            attempts=self.attempts,
            failure=self.failure,
            upstream_status=self.upstream_status,
            version="1.0" if self.http10 else "1.1",
        )
        if combined:
            record.referer = self.header_text(b"referer")
            record.user_agent = self.header_text(b"user-agent")
        return record

    def header_text(self, name: bytes) -> str:
        """Return the first value of a request header as text, or "-"."""
        for (_, value), key in zip(self.headers, self.header_names, strict=True):
            if key == name:
                return value.decode("latin-1")
        return "-"
