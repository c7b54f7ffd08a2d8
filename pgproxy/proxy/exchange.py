"""One request through the proxy: route, pick, connect, forward, respond, log.

The downstream connection creates an Exchange once a request head has been
parsed and passed the framing checks, so a malformed request never reaches
this module. Everything here runs in event-loop callbacks; the only task is
the one opening a new upstream connection on a pool miss.

Invariants:
- The log phase runs exactly once per exchange, whatever ends it.
- A retry goes to an endpoint not tried yet, and only when it is safe: no
  byte of the request reached the upstream (connect failure), or the route
  opts in ("reset-before-response", or 502/503/504 for an idempotent
  request or one with Idempotency-Key), and every body byte is still held
  for replay. The route timeout covers every attempt.
- Once a byte of the response has been written downstream, a failure can
  only cut the response short (close without the final chunk, or with
  fewer bytes than Content-Length), never complete it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from pgproxy.balancing import hash_key_value
from pgproxy.errors import NoEndpointError, ProxyError, UpstreamError
from pgproxy.graph.types import Endpoint, Route
from pgproxy.observability.access import AccessRecord
from pgproxy.proxy.framing import (
    BadResponseError,
    RequestInfo,
    ResponseInfo,
    check_response_head,
)
from pgproxy.proxy.headers import (
    build_interim_head,
    build_request_head,
    build_response_head,
)
from pgproxy.proxy.respond import RETRY_AFTER_SECONDS, error_response
from pgproxy.proxy.retry import may_retry_error, may_retry_status
from pgproxy.proxy.service import ClusterRuntime, RuntimeGraph
from pgproxy.proxy.upstream import EndpointPool, UpstreamConnection

if TYPE_CHECKING:
    from pgproxy.proxy.downstream import DownstreamProtocol

logger = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset(
    {b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"}
)
# Request body bytes held for a possible retry; a larger body is streamed once.
REPLAY_LIMIT = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class Exchange:
    """One request and its response, from the parsed head to the access log."""

    __slots__ = (
        "attempts",
        "body_chunks",
        "body_held",
        "bytes_in",
        "bytes_out",
        "candidates",
        "client_keep_alive",
        "cluster",
        "connect_task",
        "deadline",
        "done",
        "downstream",
        "early_data",
        "endpoint",
        "failure",
        "head_deadline",
        "headers",
        "http10",
        "info",
        "last_error",
        "method",
        "out_chunked",
        "pending",
        "pool",
        "replayable",
        "request_complete",
        "response_info",
        "route",
        "runtime",
        "sent_continue",
        "started",
        "status",
        "tried",
        "tunnel",
        "upstream",
        "upstream_head",
        "upstream_status",
        "wall_started",
        "written",
    )

    def __init__(
        self,
        downstream: DownstreamProtocol,
        method: bytes,
        headers: list[tuple[bytes, bytes]],
        info: RequestInfo,
        http10: bool,
    ) -> None:
        self.downstream = downstream
        self.method = method
        self.headers = headers
        self.info = info
        self.http10 = http10
        self.runtime: RuntimeGraph = downstream.service.current
        self.started = time.monotonic()
        self.wall_started = time.time()
        self.request_complete = not info.has_body
        self.client_keep_alive = info.keep_alive
        self.body_chunks: list[bytes] = []
        self.body_held = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.replayable = True
        self.sent_continue = False
        self.early_data = b""
        self.route: Route | None = None
        self.cluster: ClusterRuntime | None = None
        self.candidates: Iterator[Endpoint] | None = None
        self.tried = 0
        self.endpoint: Endpoint | None = None
        self.pool: EndpointPool | None = None
        self.upstream: UpstreamConnection | None = None
        self.upstream_head = b""
        self.connect_task: asyncio.Task[None] | None = None
        self.attempts = 0
        self.last_error: ProxyError | None = None
        self.deadline = 0.0
        self.head_deadline = 0.0
        self.status = 0
        self.upstream_status: int | None = None
        self.response_info: ResponseInfo | None = None
        self.pending = b""
        self.written = False
        self.out_chunked = False
        self.tunnel = False
        self.failure: str | None = None
        self.done = False

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.method.decode()} {self.info.target[:60]!r} "
            f"status={self.status} attempts={self.attempts} done={self.done}>"
        )

    # route and pick

    def start(self) -> None:
        """Route the request and start the first attempt (or reply directly)."""
        info = self.info
        target = info.target
        path, _, query = target.decode("latin-1").partition("?")
        headers = self.downstream.header_map(self.headers)
        route = self.runtime.graph.match(
            self.downstream.listener_name,
            self.method.decode("ascii"),
            info.host,
            path,
            headers,
        )
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
        assert route.cluster is not None
        cluster = self.runtime.clusters[route.cluster]
        self.cluster = cluster
        key = None
        spec = cluster.config.hash_key
        if spec is not None and cluster.config.balancer == "consistent_hash":
            key = hash_key_value(spec, headers, path, query, self.downstream.client_ip)
        self.candidates = cluster.balancer.candidates(key)
        self.set_deadline(self.downstream.loop.time() + route.timeout)
        self.next_attempt()

    def pick(self) -> Endpoint | None:
        """Return the next endpoint to try: untried and available, in balancer order."""
        cluster = self.cluster
        assert cluster is not None and self.candidates is not None
        health = self.downstream.service.health
        ignore_health = (
            cluster.config.when_all_unhealthy == "route_to_all"
            and health.all_unavailable(cluster.name)
        )
        for endpoint in self.candidates:
            if ignore_health or health.is_available(endpoint):
                return endpoint
        return None

    def next_attempt(self) -> None:
        """Try the next endpoint: a pooled connection at once, or connect."""
        endpoint = self.pick()
        if endpoint is None:
            error = self.last_error or NoEndpointError(
                f'no endpoint of cluster "{self.cluster_name}" is available'
            )
            self.fail(error)
            return
        assert self.cluster is not None
        self.endpoint = endpoint
        self.attempts += 1
        pool = self.cluster.pools[endpoint.address]
        self.pool = pool
        conn = pool.acquire()
        if conn is not None:
            self.attach(conn)
            return
        self.connect_task = self.downstream.loop.create_task(self.connect(pool))

    async def connect(self, pool: EndpointPool) -> None:
        """Open a new connection to the picked endpoint, then forward on it."""
        assert self.cluster is not None
        try:
            conn = await pool.connect(self.cluster.config.connect_timeout)
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
        parts = [self.upstream_head]
        if self.info.chunked:
            for chunk in self.body_chunks:
                parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            if self.request_complete:
                parts.append(_LAST_CHUNK)
        else:
            parts += self.body_chunks
        conn.send(b"".join(parts))
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
        elif cluster.config.host_header == "endpoint" or not info.host_raw:
            host = cluster.hosts[self.endpoint.address]
        else:
            host = info.host_raw
        target = info.target
        prefix = self.runtime.strip.get(self.route.index)
        if prefix is not None:
            from pgproxy.proxy.headers import strip_path_prefix

            target = strip_path_prefix(target, prefix)
        return build_request_head(
            self.method, target, self.headers, info, host, self.downstream.forwarding
        )

    def on_request_body(self, chunk: bytes) -> None:
        """Forward a body chunk from the client, or hold it until connected."""
        self.bytes_in += len(chunk)
        if self.replayable:
            self.body_chunks.append(chunk)
            self.body_held += len(chunk)
        conn = self.upstream
        if conn is not None:
            if self.info.chunked:
                conn.send(b"%x\r\n%b\r\n" % (len(chunk), chunk))
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
                conn.send(_LAST_CHUNK)
            self.arm_head_timeout()

    def arm_head_timeout(self) -> None:
        """Start the response header timeout once the request is fully sent."""
        assert self.cluster is not None
        at = self.downstream.loop.time() + self.cluster.config.response_header_timeout
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

    @property
    def cluster_name(self) -> str | None:
        """Name of the routed cluster, if any."""
        return self.cluster.name if self.cluster is not None else None

    # respond

    def on_response_head(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        version: str,
    ) -> None:
        """Check the upstream response head and relay it, or retry."""
        conn = self.upstream
        route = self.route
        assert conn is not None and self.endpoint is not None and route is not None
        if status < 200 and status != 101:
            if status != 100 and not self.http10:
                self.downstream.write(build_interim_head(status, reason, headers))
            return
        self.head_deadline = 0.0
        self.upstream_status = status
        try:
            info = check_response_head(status, version, headers, self.method == b"HEAD")
            if status == 101 and self.info.upgrade is None:
                raise BadResponseError(
                    "101 Switching Protocols without an upgrade request"
                )
        except BadResponseError as exc:
            conn.fail(f"invalid response: {exc}", "bad_response")
            return
        if status >= 502 and status <= 504:
            self.record_failure(self.endpoint, f"HTTP {status}", f"http_{status}")
            if may_retry_status(
                route,
                self.attempts,
                status,
                self.method,
                self.info.has_idempotency_key,
                self.request_complete and self.replayable,
            ):
                logger.info(
                    "endpoint %s returned %d, retrying on another endpoint",
                    self.endpoint,
                    status,
                )
                self.release_upstream(reuse=False)
                self.next_attempt()
                return
        else:
            self.downstream.service.health.record_success(self.endpoint)
        self.response_info = info
        if not info.keep_alive:
            conn.keep_alive = False
        self.relay_head(status, reason, headers, info)

    def relay_head(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        info: ResponseInfo,
    ) -> None:
        """Write the response head downstream with the framing the client needs."""
        self.status = status
        body = info.body
        close_delimited = body == "close" or (body == "chunked" and self.http10)
        self.out_chunked = not self.http10 and body in ("chunked", "close")
        keep_alive = (
            self.client_keep_alive
            and self.request_complete
            and not close_delimited
            and not self.downstream.service.draining
            and self.info.upgrade is None
        )
        self.client_keep_alive = keep_alive or status == 101
        head = build_response_head(
            status,
            reason,
            headers,
            info,
            chunked=self.out_chunked,
            keep_alive=keep_alive,
            client_http10=self.http10,
        )
        if status == 101:
            self.start_tunnel(head)
            return
        self.pending = head

    def flush_response(self) -> None:
        """Write a response head still held back to join the first body bytes."""
        if self.pending:
            data, self.pending = self.pending, b""
            self.written = True
            self.downstream.write(data)

    def on_response_body(self, body: bytes) -> None:
        """Relay a piece of the response body, re-framed for the client."""
        if self.response_info is None:
            return
        self.bytes_out += len(body)
        if self.out_chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        if self.pending:
            body = self.pending + body
            self.pending = b""
        self.written = True
        self.downstream.write(body)

    def on_interim_complete(self) -> None:
        """Note the end of a 1xx interim response; the final one follows."""

    def on_response_complete(self) -> None:
        """Finish the response: end its framing, pool the connection, log."""
        if self.response_info is None or self.done:
            return
        tail = self.pending
        self.pending = b""
        if self.out_chunked:
            tail += _LAST_CHUNK
        if tail:
            self.written = True
            self.downstream.write(tail)
        self.release_upstream(reuse=self.request_complete)
        self.finish()

    def on_upstream_eof(self) -> bool:
        """Handle an upstream EOF after response bytes; True if it ends the body."""
        info = self.response_info
        if info is not None and info.body == "close":
            if self.upstream is not None:
                self.upstream.keep_alive = False
            self.on_response_complete()
            return True
        return False

    def release_upstream(self, *, reuse: bool) -> None:
        """Return the upstream connection to its pool, or close it."""
        conn, self.upstream = self.upstream, None
        if conn is None:
            return
        assert (
            self.pool is not None
            and self.cluster is not None
            and self.endpoint is not None
        )
        self.cluster.balancer.on_request_end(self.endpoint)
        if not reuse or conn.exchange is not self:
            conn.abort()
            self.pool.forget_active()
            return
        self.pool.release(conn)

    # failures

    def on_upstream_failed(self, error: UpstreamError) -> None:
        """Retry, reply with an error, or cut the response short."""
        if self.endpoint is not None:
            self.record_failure(self.endpoint, error.flag, error.flag)
        self.release_upstream(reuse=False)
        self.last_error = error
        self.head_deadline = 0.0
        if self.written or self.tunnel:
            logger.warning("endpoint %s failed mid-response: %s", error.endpoint, error)
            self.failure = error.flag
            self.downstream.abort()
            self.finish()
            return
        self.pending = b""
        self.response_info = None
        if self.route is not None and may_retry_error(
            self.route, self.attempts, self.replayable, error
        ):
            logger.info("%s; retrying on another endpoint", error)
            self.next_attempt()
            return
        self.fail(error)

    def fail(self, error: ProxyError) -> None:
        """Reply with the error's status, logging upstream failures."""
        if isinstance(error, UpstreamError):
            logger.warning("request to endpoint %s failed: %s", error.endpoint, error)
        elif isinstance(error, NoEndpointError):
            logger.warning("%s", error)
        self.respond_error(
            error.status,
            str(error) if error.status != 503 else "no endpoint is available",
            flag=error.flag,
            retry_after=RETRY_AFTER_SECONDS if error.status == 503 else None,
        )

    def respond_error(
        self,
        status: int,
        message: str,
        *,
        flag: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Write an error response of the proxy's own and end the exchange."""
        if status >= 500 and flag is not None:
            message = f"{_ERROR_TEXT.get(status, 'upstream error')} ({flag})"
        self.status = status
        self.failure = flag
        close = (
            not self.request_complete
            or not self.client_keep_alive
            or self.info.upgrade is not None
        )
        self.client_keep_alive = not close
        self.written = True
        self.downstream.write(
            error_response(
                status,
                message,
                close=close,
                head_only=self.method == b"HEAD",
                retry_after=retry_after,
            )
        )
        self.finish()

    def on_deadline(self, now: float) -> None:
        """Handle a passed route deadline or response header timeout."""
        if self.done or self.tunnel:
            return
        if self.deadline and now >= self.deadline:
            flag, message = "route_timeout", "route timeout"
        elif self.head_deadline and now >= self.head_deadline:
            flag, message = "upstream_timeout", "response header timeout"
            if self.endpoint is not None:
                self.record_failure(self.endpoint, flag, flag)
        else:
            return
        self.cancel_connect()
        self.release_upstream(reuse=False)
        logger.warning(
            "request to endpoint %s failed: %s after %.1fs",
            self.endpoint,
            message,
            time.monotonic() - self.started,
        )
        if self.written:
            self.failure = flag
            self.downstream.abort()
            self.finish()
            return
        self.pending = b""
        self.respond_error(504, message, flag=flag)

    def abort_request(self, status: int, message: str) -> None:
        """End an exchange whose request body turned out malformed or too large."""
        self.client_keep_alive = False
        if self.done:
            return
        self.cancel_connect()
        self.release_upstream(reuse=False)
        if self.written:
            self.failure = "bad_request"
            self.downstream.abort()
            self.finish()
            return
        self.pending = b""
        self.request_complete = False
        self.respond_error(status, message, flag="bad_request")

    def on_client_closed(self) -> None:
        """Stop work for a client that went away (access log: client_closed)."""
        if self.done:
            return
        self.cancel_connect()
        self.release_upstream(reuse=False)
        if not self.written:
            self.status = 499
        self.failure = self.failure or "client_closed"
        self.finish()

    def cancel_connect(self) -> None:
        """Cancel a connect in progress."""
        task, self.connect_task = self.connect_task, None
        if task is not None:
            task.cancel()

    # tunnel (after 101 Switching Protocols)

    def start_tunnel(self, head: bytes) -> None:
        """Switch both connections to relaying raw bytes."""
        conn = self.upstream
        assert conn is not None
        self.tunnel = True
        self.deadline = self.head_deadline = 0.0
        conn.tunnel = True
        self.written = True
        self.downstream.write(head)
        self.downstream.start_tunnel(self)
        if self.early_data:
            data, self.early_data = self.early_data, b""
            conn.send(data)

    def on_upgraded(self, rest: bytes) -> None:
        """Relay bytes that followed the 101 head in the same read."""
        if rest:
            self.on_tunnel_upstream_data(rest)

    def on_tunnel_upstream_data(self, data: bytes) -> None:
        """Relay tunnel bytes from the upstream to the client."""
        self.bytes_out += len(data)
        self.downstream.write(data)

    def on_tunnel_client_data(self, data: bytes) -> None:
        """Relay tunnel bytes from the client to the upstream."""
        self.bytes_in += len(data)
        if self.upstream is not None:
            self.upstream.send(data)

    def on_tunnel_closed(self) -> None:
        """End the tunnel when the upstream closes its side."""
        self.release_upstream(reuse=False)
        self.downstream.close()
        self.finish()

    # backpressure

    def pause_request_body(self) -> None:
        """Stop reading the client while the upstream write buffer is full."""
        self.downstream.pause_body()

    def resume_request_body(self) -> None:
        """Read the client again."""
        self.downstream.resume_body()

    def record_failure(self, endpoint: Endpoint, reason: str, flag: str) -> None:
        """Report a failed attempt to the health table and the metrics."""
        service = self.downstream.service
        health = service.health
        ejections = health.ejections_total
        health.record_failure(endpoint, reason)
        metrics = service.metrics
        if metrics is not None:
            metrics.record_upstream_failure(endpoint.cluster, endpoint.address, flag)
            if health.ejections_total != ejections:
                metrics.record_ejection(endpoint.cluster, endpoint.address)

    # log

    def finish(self) -> None:
        """Run the log phase and hand the connection to the next request."""
        if self.done:
            return
        self.done = True
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
            stats.observe(self.status, time.monotonic() - self.started, self.attempts)
        access = self.downstream.service.access
        if access.enabled:
            access.write(self.access_record())
        self.downstream.exchange_done(self)

    def access_record(self) -> AccessRecord:
        """Build the access record of this exchange."""
        route = self.route
        return AccessRecord(
            time=self.wall_started,
            client=self.downstream.client,
            listener=self.downstream.listener_name,
            method=self.method.decode("ascii"),
            path=self.info.target.decode("latin-1"),
            status=self.status,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            duration_ms=round((time.monotonic() - self.started) * 1000, 3),
            route=route.name if route is not None else None,
            cluster=self.cluster_name,
            endpoint=self.endpoint.address if self.endpoint is not None else None,
            attempts=self.attempts,
            failure=self.failure,
            upstream_status=self.upstream_status,
            referer=self.header_text(b"referer"),
            user_agent=self.header_text(b"user-agent"),
            version="1.0" if self.http10 else "1.1",
        )

    def header_text(self, name: bytes) -> str:
        """Return the first value of a request header as text, or "-"."""
        for key, value in self.headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return "-"


_ERROR_TEXT = {
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}
