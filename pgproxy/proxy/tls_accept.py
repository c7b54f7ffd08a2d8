"""The TLS handshake of a client connection, counted against the connection limits.

With `ssl=` passed to `loop.create_server`, connection_made runs only once
the handshake has finished. Clients that connected and sent nothing then
held a file descriptor each, uncounted by any limit, for up to 60 s (the
default handshake timeout of asyncio and uvloop). With an open file limit
of 64, 80 such connections made every new connection fail.
TLS listeners therefore accept plain TCP: `TlsHandshake` admits the
connection under `max_connections` and the process's cap first, and counts
it in the listener's connection metrics. It then runs the handshake with
`loop.start_tls` and passes the TLS transport to the connection's
`DownstreamProtocol`, which takes over its place in both counts.

Until that hand-over, bytes can reach this protocol on either side of the
handshake. uvloop starts reading once connection_made returns, before the
handshake task runs. The TLS protocol also passes on request bytes that
came with the client's Finished message before start_tls returns. Both
kinds are kept here and passed on in order.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from pgproxy.observability.metrics import ConnectionStats
    from pgproxy.proxy.downstream import DownstreamProtocol
    from pgproxy.proxy.exchange import Exchange
    from pgproxy.proxy.service import ProxyService

logger = logging.getLogger(__name__)


class TlsHandshake(asyncio.Protocol):
    """A TLS listener's client connection until its handshake has finished."""

    # A connection in its handshake carries no tunnel yet; a reload reads this.
    tunnel: Exchange | None = None

    def __init__(
        self,
        service: ProxyService,
        downstream: DownstreamProtocol,
        context: ssl.SSLContext,
    ) -> None:
        self.service = service
        self.downstream = downstream
        self.listener_name = downstream.listener_name
        self.context = context
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        # Bytes read before start_tls took the transport over (the ClientHello).
        self.early: list[bytes] = []
        # Decrypted bytes and EOF that arrived before the hand-over.
        self.received: list[bytes] = []
        self.eof = False
        # The listener's connection stats while this protocol counts the
        # connection in them; None once it is closed or handed over.
        self.stats: ConnectionStats | None = None

    def __repr__(self) -> str:
        return f"<TlsHandshake listener={self.listener_name}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        admitted = self.service.admit(self, self.downstream.limits.max_connections)
        metrics = self.service.current.metrics
        if metrics is not None and self.listener_name in metrics:
            self.stats = metrics[self.listener_name].connections
            self.stats.connection_opened()
        if not admitted:
            if self.stats is not None:
                self.stats.rejected += 1
            transport.abort()
            return
        if self.service.draining:
            transport.close()
            return
        self.task = self.downstream.loop.create_task(self._handshake(transport))

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and transport.get_protocol() is self:
            self.early.append(data)
            transport.pause_reading()
        else:
            self.received.append(data)

    def eof_received(self) -> bool | None:
        if self._owns_transport():
            return False  # no handshake can follow, so close
        self.eof = True
        return True

    def _owns_transport(self) -> bool:
        # True before start_tls has put its TLS protocol on the transport.
        transport = self.transport
        return transport is not None and transport.get_protocol() is self

    def connection_lost(self, exc: Exception | None) -> None:
        # Called only while this protocol still owns the transport.
        self.service.forget(self)
        self._count_closed()

    def _count_closed(self) -> None:
        # Called on each path that ends the connection before a hand-over,
        # and some end it twice, so it counts once.
        stats, self.stats = self.stats, None
        if stats is not None:
            stats.connection_closed()

    async def _handshake(self, transport: asyncio.Transport) -> None:
        tls: asyncio.Transport | None = None
        try:
            if transport.is_closing():
                return
            loop = self.downstream.loop
            starting = asyncio.ensure_future(
                loop.start_tls(transport, self, self.context, server_side=True)
            )
            # start_tls runs to its first await in the next loop iteration and
            # schedules its TLS protocol's connection_made. Calling call_soon
            # from that iteration queues the early bytes after it, before the
            # loop reads the socket again.
            loop.call_soon(loop.call_soon, self._pass_early_bytes, transport)
            tls = await starting
        except OSError as exc:
            # ssl.SSLError, a reset, or the 60 s handshake timeout.
            logger.debug(
                'TLS handshake failed on listener "%s": %s', self.listener_name, exc
            )
        finally:
            self.service.forget(self)
            # start_tls returns a closed transport when the client closed
            # cleanly during the handshake.
            if tls is None or tls.is_closing():
                self._count_closed()
        if tls is not None and not tls.is_closing():
            self._hand_over(tls)

    def _hand_over(self, tls: asyncio.Transport) -> None:
        downstream = self.downstream
        tls.set_protocol(downstream)
        stats, self.stats = self.stats, None
        downstream.adopt_connection_stats(stats)
        downstream.connection_made(tls)
        received, self.received = self.received, []
        for data in received:
            if tls.is_closing():
                return
            downstream.data_received(data)
        if self.eof and not tls.is_closing() and not downstream.eof_received():
            tls.close()

    def _pass_early_bytes(self, transport: asyncio.Transport) -> None:
        early, self.early = self.early, []
        protocol = transport.get_protocol()
        if not early or protocol is self or transport.is_closing():
            return
        for data in early:
            feed_protocol(protocol, data)

    def drain(self) -> None:
        """Close the connection, ending its handshake."""
        self.close()

    def close(self) -> None:
        """Close the connection, ending its handshake."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        if self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Drop the connection at once, as no response has begun."""
        self.abort()

    def cancel(self, flag: str) -> None:
        """Drop the connection at once. A handshake has no exchange to log."""
        self.abort()


def feed_protocol(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Pass `data` to `protocol` as its transport would have.

    The TLS protocols of uvloop and asyncio are buffered protocols, which
    take bytes through get_buffer and buffer_updated, not data_received.
    """
    if not hasattr(protocol, "get_buffer"):
        cast(asyncio.Protocol, protocol).data_received(data)
        return
    buffered = cast(asyncio.BufferedProtocol, protocol)
    view = memoryview(data)
    while view:
        buffer = memoryview(buffered.get_buffer(len(view)))
        count = min(len(buffer), len(view))
        buffer[:count] = view[:count]
        buffered.buffer_updated(count)
        view = view[count:]
