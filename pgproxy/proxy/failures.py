"""Failures of one exchange: retries, error replies, deadlines, client close.

Invariants:
- A failed attempt is retried on another endpoint only when the route's
  retry policy allows it (pgproxy/proxy/retry.py) and the whole request body
  is still held for replay. Otherwise the client gets the error's status.
- Once a byte of the response has been written downstream, a failure can
  only cut the response short (close without the final chunk, with fewer
  bytes than Content-Length, or with a TCP reset where the client reads the
  body until the connection closes), never complete it.
- Every failed attempt is reported to the health table and the metrics.
"""

from __future__ import annotations

import logging
import time

from pgproxy.errors import (
    EndpointBusyError,
    NoEndpointError,
    ProxyError,
    UpstreamError,
)
from pgproxy.graph.types import Endpoint
from pgproxy.observability.throttle import log_failure, message_kind
from pgproxy.proxy.exchange_state import ExchangeState
from pgproxy.proxy.respond import RETRY_AFTER_SECONDS, error_body, error_response
from pgproxy.proxy.retry import may_retry_error, may_retry_fresh_connection

logger = logging.getLogger(__name__)


class ExchangeFailures(ExchangeState):
    """Handles failed attempts, timeouts and clients that go away."""

    __slots__ = ()

    # failures

    def on_upstream_failed(self, error: UpstreamError) -> None:
        """Retry, reply with an error, or cut the response short."""
        if self.pool is not None and may_retry_fresh_connection(
            error,
            self.stale_retried,
            self.method,
            self.info.has_idempotency_key,
            self.replayable,
        ):
            logger.debug("%s; repeating on a fresh connection", error)
            self.stale_retried = True
            self.release_upstream(reuse=False)
            self.head_deadline = 0.0
            self.pending = b""
            self.response_info = None
            # With max_connections, the slot just freed may have gone to a
            # waiting request, and then this one waits too.
            self.open_upstream(self.pool, fresh=True)
            return
        if isinstance(error, EndpointBusyError):
            # pgproxy's own limit, not the endpoint's fault: metrics only.
            self.record_overflow(error)
        elif self.endpoint is not None:
            self.record_failure(self.endpoint, error.flag, error.flag)
        self.release_upstream(reuse=False)
        self.last_error = error
        self.head_deadline = 0.0
        if self.written or self.tunnel:
            log_failure(
                logger,
                logging.WARNING,
                ("mid-response", error.endpoint, message_kind(str(error))),
                "endpoint %s failed mid-response: %s",
                error.endpoint,
                error,
            )
            self.failure = error.flag
            self.cut_response()
            self.finish()
            return
        self.pending = b""
        self.response_info = None
        if self.route is not None and may_retry_error(
            self.route, self.attempts, self.replayable, error
        ):
            # Picked before logging, so that a retry with no endpoint left
            # fails with this error instead of logging a retry.
            endpoint = self.pick()
            if endpoint is not None:
                log_failure(
                    logger,
                    logging.INFO,
                    ("retry", error.endpoint, message_kind(str(error))),
                    "request to endpoint %s failed (%s), retrying on endpoint %s",
                    error.endpoint,
                    error,
                    endpoint.address,
                )
                self.try_endpoint(endpoint)
                return
        self.fail(error)

    def fail(self, error: ProxyError) -> None:
        """Reply with the error's status, logging upstream failures."""
        if isinstance(error, UpstreamError):
            log_failure(
                logger,
                logging.WARNING,
                ("failed", error.endpoint, message_kind(str(error))),
                "request to endpoint %s failed: %s",
                error.endpoint,
                error,
            )
        elif isinstance(error, NoEndpointError):
            log_failure(logger, logging.WARNING, ("none", str(error)), "%s", error)
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
        # The access log counts this body like the body of a proxied response.
        head_only = self.method == b"HEAD"
        self.bytes_out = 0 if head_only else len(error_body(message))
        self.downstream.write(
            error_response(
                status,
                message,
                close=close,
                head_only=head_only,
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
        log_failure(
            logger,
            logging.WARNING,
            ("timeout", self.endpoint, flag),
            "request to endpoint %s failed: %s after %.1fs",
            self.endpoint,
            message,
            time.monotonic() - self.started,
        )
        if self.written:
            self.failure = flag
            self.cut_response()
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
            self.cut_response()
            self.finish()
            return
        self.pending = b""
        self.request_complete = False
        self.respond_error(status, message, flag="bad_request")

    def on_client_closed(self) -> None:
        """Stop work for a client that went away (access log: client_closed)."""
        self._end_for_client(self.failure or "client_closed")

    def cut_response(self) -> None:
        """Drop the client connection of a response that cannot be completed.

        A client reading the body until the connection closes (HTTP/1.0,
        with chunked or close-delimited upstream bodies) takes a FIN for the
        end of the body, so it gets a TCP reset. With chunked or
        Content-Length framing a FIN already shows the cut, and the bytes
        already in the send buffer still reach the client.
        """
        info = self.response_info
        if (
            self.http10
            and info is not None
            and (info.body == "chunked" or info.body == "close")
        ):
            self.downstream.reset()
        else:
            self.downstream.abort()

    def on_send_timeout(self) -> None:
        """End the exchange of a client that stopped reading (send_timeout).

        A request that had no response bytes written yet, one pipelined
        behind the response the client did not read, is logged with 499
        like a client that closed.
        """
        self._end_for_client("send_timeout")

    def on_cancelled(self, flag: str) -> None:
        """End the exchange of a connection that pgproxy resets itself.

        It is logged with `flag` (such as `drain_timeout`), and with 499 if
        none of its response was written, as for a client that went away.
        """
        self._end_for_client(flag)

    def _end_for_client(self, flag: str) -> None:
        # The upstream connection is closed, not pooled, because it may be
        # mid-response.
        if self.done:
            return
        self.cancel_connect()
        self.release_upstream(reuse=False)
        if not self.written:
            self.status = 499
        self.failure = flag
        self.finish()

    def cancel_connect(self) -> None:
        """Cancel a connect in progress."""
        task, self.connect_task = self.connect_task, None
        if task is not None:
            task.cancel()
        if self.connect_unstarted:
            # A task cancelled before its first step never runs its code,
            # so the connection it was to open is counted down here.
            self.connect_unstarted = False
            assert self.pool is not None
            self.pool.cancel_connect()

    def record_overflow(self, error: EndpointBusyError) -> None:
        """Count a request that found no free connection to its endpoint."""
        metrics = self.downstream.service.metrics
        if metrics is not None and self.endpoint is not None:
            metrics.record_upstream_failure(
                self.endpoint.cluster, self.endpoint.address, error.flag
            )

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


_ERROR_TEXT = {
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}
