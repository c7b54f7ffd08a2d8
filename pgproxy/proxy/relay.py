"""The response relay and the Upgrade tunnel of one exchange.

Invariants:
- The response head is held back and written together with the first body
  bytes, so a small response costs one write. Chunked and close-delimited
  bodies are re-framed for the client: chunked for HTTP/1.1, close-delimited
  for HTTP/1.0 (RFC 9112 section 6.3).
- The upstream connection goes back to its pool only after a complete
  response to a complete request; any other end closes it.
- After 101 Switching Protocols both connections relay raw bytes, and the
  exchange ends when the upstream closes its side.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final, cast

from pgproxy.observability.throttle import log_failure
from pgproxy.proxy.failures import ExchangeFailures
from pgproxy.proxy.framing import BadResponseError, ResponseInfo, check_response_head
from pgproxy.proxy.headers import (
    build_interim_head,
    build_response_head,
    join_response_head,
)
from pgproxy.proxy.response_head import ResponseHead
from pgproxy.proxy.retry import may_retry_status

if TYPE_CHECKING:
    from pgproxy.proxy.exchange import Exchange

logger = logging.getLogger(__name__)

LAST_CHUNK: Final = b"0\r\n\r\n"


class ResponseRelay(ExchangeFailures):
    """Relays the upstream response, or the tunnel after a 101, to the client."""

    __slots__ = ()

    # respond

    def on_response_head(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        names: list[bytes],
        version: str,
    ) -> None:
        """Check the upstream response head and relay it, or retry.

        `names` are the lower-case header names, parallel to `headers`.
        """
        conn = self.upstream
        assert conn is not None
        if status < 200 and status != 101:
            if status < 100:
                # RFC 9110 section 15: a status code has three digits, 100-599.
                # check_response_head rejects codes above 599 the same way.
                conn.fail(
                    f"invalid response: status code {status} is outside 100-599",
                    "bad_response",
                )
                return
            if status != 100 and not self.http10:
                self.downstream.write(build_interim_head(status, reason, headers))
            return
        self.head_deadline = 0.0
        self.upstream_status = status
        try:
            head_request = self.method == b"HEAD"
            info = check_response_head(status, version, headers, head_request, names)
            if status == 101 and self.info.upgrade is None:
                raise BadResponseError(
                    "101 Switching Protocols without an upgrade request"
                )
        except BadResponseError as exc:
            conn.fail(f"invalid response: {exc}", "bad_response")
            return
        if not self.accept_response(status, info):
            return
        keep_alive = self.client_framing(status, info)
        head = build_response_head(
            status,
            reason,
            headers,
            info,
            chunked=self.out_chunked,
            keep_alive=keep_alive,
            client_http10=self.http10,
            names=names,
        )
        if self.runtime.response_rules:
            head = self.apply_response_rules(head)
        if status == 101:
            self.start_tunnel(head)
            return
        self.pending = head

    def on_read_response_head(self, head: ResponseHead) -> None:
        """Relay a final response head read by pgproxy/proxy/response_head.py.

        Such a head is well-formed and frames its body by length, so only
        the status decides between relaying it and retrying.
        """
        self.head_deadline = 0.0
        self.upstream_status = head.status
        if not self.accept_response(head.status, head.info):
            return
        keep_alive = self.client_framing(head.status, head.info)
        self.pending = join_response_head(
            head.unchanged_lines,
            head.via,
            keep_alive=keep_alive,
            client_http10=self.http10,
        )
        if self.runtime.response_rules:
            self.pending = self.apply_response_rules(self.pending)

    def apply_response_rules(self, head: bytes) -> bytes:
        """Apply the route's response_headers rules to a head for the client."""
        assert self.route is not None
        rules = self.runtime.response_rules.get(self.route.index)
        return head if rules is None else rules.apply(head)

    def accept_response(self, status: int, info: ResponseInfo) -> bool:
        """Record the endpoint's outcome; return False if the exchange retries."""
        conn = self.upstream
        route = self.route
        assert conn is not None and self.endpoint is not None and route is not None
        if status >= 502 and status <= 504:
            self.record_failure(self.endpoint, f"HTTP {status}", f"http_{status}")
            retryable = may_retry_status(
                route,
                self.attempts,
                status,
                self.method,
                self.info.has_idempotency_key,
                self.request_complete and self.replayable,
            )
            # With no endpoint left to retry on, this response is relayed.
            retry_on = self.pick() if retryable else None
            if retry_on is not None:
                log_failure(
                    logger,
                    logging.INFO,
                    ("retry-status", self.endpoint, status),
                    "endpoint %s returned %d, retrying on endpoint %s",
                    self.endpoint,
                    status,
                    retry_on.address,
                )
                self.release_upstream(reuse=False)
                self.try_endpoint(retry_on)
                return False
        else:
            self.downstream.service.health.record_success(self.endpoint)
        self.response_info = info
        if not info.keep_alive:
            conn.keep_alive = False
        return True

    def client_framing(self, status: int, info: ResponseInfo) -> bool:
        """Choose the framing towards the client; return whether it stays open."""
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
        return keep_alive

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
            tail += LAST_CHUNK
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
        # Only Exchange derives from ResponseRelay, so `self` is an Exchange.
        self.downstream.start_tunnel(cast("Exchange", self))
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
        self.downstream.tunnel_activity()
        self.downstream.write(data)

    def on_tunnel_client_data(self, data: bytes) -> None:
        """Relay tunnel bytes from the client to the upstream."""
        self.bytes_in += len(data)
        if self.upstream is not None:
            self.upstream.send(data)

    def on_tunnel_client_eof(self) -> bool:
        """Pass the client's FIN on to the upstream, and return whether it was sent."""
        conn = self.upstream
        return conn is not None and conn.write_eof()

    def end_idle_tunnel(self) -> None:
        """Close both sides of a tunnel that carried no data for too long."""
        self.failure = "tunnel_idle_timeout"
        self.release_upstream(reuse=False)
        self.downstream.close()
        self.finish()

    def on_tunnel_closed(self) -> None:
        """End the tunnel when the upstream closes its side."""
        self.release_upstream(reuse=False)
        self.downstream.close()
        self.finish()
