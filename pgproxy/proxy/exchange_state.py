"""The fields of one exchange, shared by the modules that drive it.

`ExchangeState` declares every attribute of an exchange in `__slots__`. The
behaviour is in `Exchange` (pgproxy/proxy/exchange.py) and its two bases,
`ResponseRelay` (pgproxy/proxy/relay.py) and `ExchangeFailures`
(pgproxy/proxy/failures.py), which add no slots. Methods one base calls on
another are declared here for the type checker only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from pgproxy.errors import ProxyError
from pgproxy.graph.types import Endpoint, Route
from pgproxy.proxy.framing import RequestInfo, ResponseInfo
from pgproxy.proxy.pool import EndpointPool
from pgproxy.proxy.service import ClusterRuntime, RuntimeGraph
from pgproxy.proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from pgproxy.proxy.downstream import DownstreamProtocol

# Final statics: compiled code reads a name imported with `from time import`
# from the module's globals dict, and `time.monotonic` from the module's.
_monotonic: Final = time.monotonic
_time: Final = time.time


class ExchangeState:
    """The state of one request and its response; see `Exchange`."""

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
        "connect_unstarted",
        "deadline",
        "deferred",
        "done",
        "downstream",
        "early_data",
        "endpoint",
        "failure",
        "head_deadline",
        "header_names",
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
        "stale_retried",
        "started",
        "status",
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
        header_names: list[bytes],
        info: RequestInfo,
        http10: bool,
    ) -> None:
        self.downstream = downstream
        self.method = method
        self.headers = headers
        self.header_names = header_names
        self.info = info
        self.http10 = http10
        self.runtime: RuntimeGraph = downstream.service.current
        self.started = _monotonic()
        self.wall_started = _time()
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
        # Endpoints that pick() passed over because they were at their
        # max_connections, in preference order.
        self.deferred: list[Endpoint] | None = None
        self.endpoint: Endpoint | None = None
        self.pool: EndpointPool | None = None
        self.upstream: UpstreamConnection | None = None
        self.upstream_head = b""
        self.connect_task: asyncio.Task[None] | None = None
        # Whether connect_task has not started yet, so that the connection
        # it counts as opening in self.pool is still to be counted down.
        self.connect_unstarted = False
        self.attempts = 0
        self.stale_retried = False
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

    @property
    def cluster_name(self) -> str | None:
        """Name of the routed cluster, if any."""
        return self.cluster.name if self.cluster is not None else None

    # Implemented further down the class chain (ExchangeFailures, then
    # ResponseRelay, then Exchange). Real methods, not declarations under
    # TYPE_CHECKING, so that mypyc compiles the calls through the vtable.

    def next_attempt(self) -> None:
        raise NotImplementedError

    def pick(self) -> Endpoint | None:
        raise NotImplementedError

    def try_endpoint(self, endpoint: Endpoint) -> None:
        raise NotImplementedError

    def open_upstream(self, pool: EndpointPool, *, fresh: bool) -> None:
        raise NotImplementedError

    async def connect(self, pool: EndpointPool) -> None:
        raise NotImplementedError

    async def connect_when_free(self, pool: EndpointPool, fresh: bool) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def release_upstream(self, *, reuse: bool) -> None:
        raise NotImplementedError
