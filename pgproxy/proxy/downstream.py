"""The client side: one asyncio Protocol per downstream connection.

Invariants:
- Requests are answered in the order they arrived. Only the front exchange
  of the queue talks to an upstream; a pipelined request waits, and reading
  pauses until it is at the front, so buffered input stays within one read.
- An exchange starts (route, pick, connect) only after the read that
  completed its head has been parsed without error, so a request whose
  head or first body bytes are malformed is answered with 4xx and never
  reaches an upstream.
- Malformed requests are logged at DEBUG only: hostile traffic must not
  flood the log.
- One timer per connection serves every deadline: idle keep-alive, header
  read, linger, tunnel idle, send timeout, and the front exchange's route
  and response header timeouts. It is re-armed only when a deadline moves
  earlier, not per request.
- The send timeout runs only while pgproxy waits for the client to read:
  from pause_writing to resume_writing, and from close() until the
  transport has written its buffer. A client that takes no bytes for
  send_timeout has its connection reset and its exchange logged with
  send_timeout.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import sys
import termios
import time
from typing import Final, cast

from pgproxy.observability.access import AccessRecord
from pgproxy.observability.metrics import ConnectionStats
from pgproxy.proxy.downstream_parsing import RequestParsing
from pgproxy.proxy.downstream_state import (
    _HEADER,
    _IDLE,
    _PAUSE_BODY,
    _PAUSE_PIPELINE,
    _TUNNEL,
    LINGER_TIMEOUT,
)
from pgproxy.proxy.exchange import Exchange
from pgproxy.proxy.headers import Forwarding, is_trusted
from pgproxy.proxy.respond import error_body, error_response
from pgproxy.proxy.upstream import WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW

logger = logging.getLogger(__name__)

# SO_LINGER on with a zero timeout: close() then sends a reset, not a FIN,
# and drops the bytes still in the send buffer (socket(7)).
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
# The ioctl that returns the bytes in a socket's send queue, sent but not
# acknowledged or not sent yet: SIOCOUTQ on Linux, 0 where termios lacks it.
_SIOCOUTQ: Final = int(getattr(termios, "TIOCOUTQ", 0))


class DownstreamProtocol(RequestParsing):
    """Parses requests from one client and runs them as Exchanges, in order."""

    __slots__ = ()

    # connection lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        self._write = transport.write
        transport.set_write_buffer_limits(WRITE_BUFFER_HIGH, WRITE_BUFFER_LOW)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            host = str(peer[0])
            self.client_ip = host
            self.client = f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
        trusted = is_trusted(self.client_ip, self.service.current.trusted_proxies)
        self._tls = transport.get_extra_info("sslcontext") is not None
        proto = b"https" if self._tls else b"http"
        self.forwarding = Forwarding(self.client_ip, proto, trusted)
        admitted = self.service.admit(self, self.limits.max_connections)
        # A TLS connection comes with the stats that counted it at its accept
        # (`adopt_connection_stats`), so it is not counted twice.
        if self._connection_stats is None:
            metrics = self.service.current.metrics
            if metrics is not None and self.listener_name in metrics:
                self._connection_stats = metrics[self.listener_name].connections
                self._connection_stats.connection_opened()
        if not admitted:
            # A reset, not a close: nothing of the request was read, and the
            # socket does not wait in TIME_WAIT while the process is at its limit.
            if self._connection_stats is not None:
                self._connection_stats.rejected += 1
            self.abort()
            return
        if self.service.draining:
            self.close()
            return
        self._set_conn_deadline(_HEADER, self.limits.header_read_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.service.forget(self)
        if self._connection_stats is not None:
            self._connection_stats.connection_closed()
            self._connection_stats = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue, self._queue = self._queue, []
        if queue and self._front_started:
            queue[0].on_client_closed()
        self._release_references()

    def adopt_connection_stats(self, stats: ConnectionStats | None) -> None:
        """Take over the connection count that a TlsHandshake began at the accept.

        Call it before `connection_made`. The connection then counts as
        closed in `stats` when it closes.
        """
        self._connection_stats = stats

    def eof_received(self) -> bool | None:
        # A FIN comes from a client giving up or from one that half-closed
        # after its last request (fortio -halfclose) and still reads. Only the
        # second kind requests closing after the response (Connection: close,
        # or HTTP/1.0 without keep-alive). Its requests are served, as HAProxy
        # does without `option abortonclose`, and the connection closes after
        # the last response. Any other client is gone, so its exchange is
        # cancelled, as nginx does by default (proxy_ignore_client_abort off),
        # and an abandoned request frees its upstream.
        if self._lingering:
            return False  # the client read the response and closed
        if self._eof:
            return True  # resume_reading after EOF reports it again
        self._eof = True
        # A client that half-closes a tunnel may still read, so the upstream
        # gets the FIN and the tunnel ends when the upstream closes its side.
        tunnel = self._tunnel
        if tunnel is not None and not self._tls and tunnel.on_tunnel_client_eof():
            return True
        if self._can_serve_after_eof():
            self._close_when_done = True
            return True
        self._client_gone()
        return False

    def _can_serve_after_eof(self) -> bool:
        # An incomplete request can never finish. asyncio's TLS transports
        # cannot stay half-open. A tunnel whose upstream cannot take a FIN
        # (TLS), or an upgrade request that may become one, ends with the
        # client's side.
        if not self._queue or self._tls or self._tunnel is not None:
            return False
        last = self._queue[-1]
        return (
            self._receiving is None
            and not self._in_head
            and not last.info.keep_alive
            and last.info.upgrade is None
        )

    def _client_gone(self) -> None:
        # The transport closes once this callback returns. Ending the exchange
        # now keeps a response that completes before connection_lost from
        # being written to a closing transport and logged as delivered.
        self._closed = True
        queue, self._queue = self._queue, []
        if queue and self._front_started:
            queue[0].on_client_closed()

    def pause_writing(self) -> None:
        if self._queue and self._front_started:
            upstream = self._queue[0].upstream
            if upstream is not None:
                upstream.pause_reading()
        self._start_send_timeout()

    def resume_writing(self) -> None:
        if self._queue and self._front_started:
            upstream = self._queue[0].upstream
            if upstream is not None:
                upstream.resume_reading()
        # A closed connection keeps its send timeout until the transport has
        # written everything, however small its buffer gets.
        if not self._closed:
            self._send_wait = None

    # exchange queue

    def _run_queue(self) -> None:
        """Start the front exchange if it has not started yet."""
        if self._starting or self._feeding:
            return
        self._starting = True
        try:
            while self._queue and not self._front_started and not self._closed:
                self._front_started = True
                self._queue[0].start()
        finally:
            self._starting = False

    def exchange_done(self, exchange: Exchange) -> None:
        """Move on after the front exchange ended: next request, idle, or close."""
        if not self._queue or self._queue[0] is not exchange:
            return
        self._queue.pop(0)
        self._front_started = False
        self._resume(_PAUSE_BODY)
        if self._tunnel is exchange:
            return
        if not exchange.client_keep_alive or (
            self._close_when_done and not self._queue
        ):
            self.close()
            return
        if self._queue:
            if len(self._queue) == 1 and self._receiving is self._queue[0]:
                self._resume(_PAUSE_PIPELINE)
            self._run_queue()
            if not self._queue and self._paused & _PAUSE_PIPELINE:
                self._resume(_PAUSE_PIPELINE)
            return
        self._resume(_PAUSE_PIPELINE)
        if self._error is not None:
            status, message = self._error
            self._write_error(status, message)
        elif self.service.draining:
            self.close()
        elif not self._in_head:
            self._set_conn_deadline(_IDLE, self.limits.idle_timeout)

    # errors

    def _reject(self, status: int, message: str) -> None:
        """Reject a malformed request after replying to the requests before it."""
        logger.debug(
            "rejecting request from %s with %d: %s", self.client, status, message
        )
        receiving, self._receiving = self._receiving, None
        self._in_head = False
        self._pause(_PAUSE_PIPELINE)
        if receiving is not None:
            if receiving is self._front_or_none() and self._front_started:
                receiving.abort_request(status, message)
                return
            # It has not started, so nothing reached an upstream. Reply in its place.
            self._queue.remove(receiving)
        if self._queue:
            self._error = (status, message)
            self._run_queue()
            return
        self._write_error(status, message)

    def _front_or_none(self) -> Exchange | None:
        return self._queue[0] if self._queue else None

    def _write_error(self, status: int, message: str) -> None:
        self._count_unrouted(status)
        self.write(error_response(status, message, close=True))
        self._log_rejected(status, message)
        self.close()

    def _log_rejected(self, status: int, message: str) -> None:
        """Write the access record of a request rejected while its head was read.

        Its method and target may be unparsed or invalid, so the record has
        "-" for the method and the raw target read so far, if any.
        """
        access = self.service.access
        if not access.enabled:
            return
        target = self._url.decode("latin-1") if self._url else "-"
        record = AccessRecord(
            time=time.time(),
            client=self.client,
            listener=self.listener_name,
            method="-",
            path=target,
            status=status,
            bytes_in=0,
            bytes_out=len(error_body(message)),
            duration_ms=0.0,
            route=None,
            cluster=None,
            endpoint=None,
            attempts=0,
            failure="client_timeout" if status == 408 else "bad_request",
            upstream_status=None,
        )
        access.write(record)

    def _count_unrouted(self, status: int) -> None:
        """Count a request rejected before routing (4xx on its head or framing)."""
        metrics = self.service.current.metrics
        listener = metrics.get(self.listener_name) if metrics is not None else None
        if listener is not None:
            listener.unrouted.observe(status, 0.0, 0)

    # used by exchanges

    def write(self, data: bytes) -> None:
        """Write bytes to the client unless the connection is gone."""
        write = self._write
        if not self._closed and write is not None:
            write(data)

    def pause_body(self) -> None:
        """Stop reading request bytes (upstream busy or not connected yet)."""
        self._pause(_PAUSE_BODY)

    def resume_body(self) -> None:
        """Read request bytes again."""
        self._resume(_PAUSE_BODY)

    @property
    def tunnel(self) -> Exchange | None:
        """The upgraded exchange relaying raw bytes, or None."""
        return self._tunnel

    def start_tunnel(self, exchange: Exchange) -> None:
        """Relay raw bytes between the client and the exchange's upstream."""
        self._tunnel = exchange
        self._tunnel_last = self.clock()
        self._set_conn_deadline(_TUNNEL, self.limits.tunnel_idle_timeout)
        self._resume(_PAUSE_BODY | _PAUSE_PIPELINE)

    def tunnel_activity(self) -> None:
        """Record tunnel bytes from the upstream, for the tunnel idle timeout."""
        self._tunnel_last = self.clock()

    def drain(self) -> None:
        """Close now if idle, otherwise after the response in progress."""
        self._close_when_done = True
        if not self._queue and not self._in_head:
            self.close()

    def close(self) -> None:
        """Close after writing what is buffered.

        While the client may still be sending the request, only the write
        side is closed at first (see `_linger`).
        """
        transport = self.transport
        if self._closed or transport is None:
            return
        self._closed = True
        # The transport stays open until the client has read what is
        # buffered, so the send timeout bounds that wait.
        if transport.get_write_buffer_size():
            self._start_send_timeout()
        # NOTE: TLS connections close at once, because asyncio's TLS
        # transports cannot close only their write side.
        if self._in_message and not self._eof and not self._tls:
            self._linger(transport)
            return
        transport.close()

    def _linger(self, transport: asyncio.Transport) -> None:
        # A close with request bytes still unread makes the kernel send a
        # reset, and a client that gets it may drop the response it has not
        # read yet (a 413 during an upload). So close the write side after
        # the response, and read and discard until the client closes, for
        # LINGER_TIMEOUT at most, as nginx's lingering_close does.
        self._lingering = True
        transport.write_eof()
        if self._paused:
            self._paused = 0
            transport.resume_reading()
        self._conn_deadline = self.clock() + LINGER_TIMEOUT
        self.watch_deadline(self._conn_deadline)

    def abort(self) -> None:
        """Drop the connection at once, discarding what the transport buffers.

        Unless client bytes are still unread, the kernel ends the connection
        with a FIN. That shows a cut chunked or Content-Length body, but a
        body read until the connection closes looks complete, so `reset` is
        for that case.
        """
        if self.transport is not None:
            self._closed = True
            self.transport.abort()

    def reset(self) -> None:
        """Drop the connection with a TCP reset instead of a FIN."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            except OSError as exc:
                logger.debug("setting SO_LINGER failed for %s: %s", self.client, exc)
        self.abort()

    def cancel(self, flag: str) -> None:
        """Reset the connection and end its exchange in progress with `flag`.

        The runtime calls it for connections still busy when a drain ends.
        A plain reset would end the exchange in connection_lost, and the
        access log would blame the client (client_closed).
        """
        # Taken first so that ending the exchange starts no queued request.
        queue, self._queue = self._queue, []
        self.reset()
        if queue and self._front_started:
            queue[0].on_cancelled(flag)

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.resume_reading()

    # deadlines

    def _set_conn_deadline(self, kind: int, timeout: float) -> None:
        self._conn_deadline_kind = kind
        self._conn_deadline = self.clock() + timeout
        self.watch_deadline(self._conn_deadline)

    def _start_send_timeout(self) -> None:
        # Called when pgproxy starts waiting for the client to read. Only
        # pause_writing and close call it, so a request whose response fits
        # in the write buffer costs nothing here.
        transport = self.transport
        if self._send_wait is not None or transport is None:
            return
        deadline = self.clock() + self.limits.send_timeout
        self._send_wait = (deadline, _unsent_bytes(transport))
        self.watch_deadline(deadline)

    def watch_deadline(self, at: float) -> None:
        """Make sure the connection timer fires no later than `at`."""
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        send_wait = self._send_wait
        if send_wait is not None and self.clock() >= send_wait[0]:
            if self._on_send_deadline(send_wait[1]):
                return
        if self._lingering:
            self._end_linger()
        elif not self._closed:
            self._on_deadlines()
        send_wait = self._send_wait
        if send_wait is not None and self.transport is not None:
            self.watch_deadline(send_wait[0])

    def _on_deadlines(self) -> None:
        now = self.clock()
        if self._conn_deadline and now >= self._conn_deadline:
            self._on_conn_deadline()
            return
        if self._queue and self._front_started:
            self._queue[0].on_deadline(now)
        pending = [self._conn_deadline]
        if self._queue and self._front_started:
            pending.append(self._queue[0].next_deadline())
        later = [at for at in pending if at]
        if later and not self._closed:
            self.watch_deadline(min(later))

    def _on_send_deadline(self, unsent_before: int) -> bool:
        """Extend the send timeout if the client read, else reset and return True."""
        # As with nginx's send_timeout, the client must take some bytes in
        # each period. The kernel's send queue counts too. Linux grows the
        # send buffer to MiBs and wakes the writer only once much of it is
        # free, so a client reading 100 KiB/s left the transport's buffer
        # unchanged for over a second (measured on loopback, Linux 6.18).
        transport = self.transport
        assert transport is not None
        unsent = _unsent_bytes(transport)
        if unsent < unsent_before:
            self._send_wait = (self.clock() + self.limits.send_timeout, unsent)
            return False
        logger.debug(
            "send timeout: client %s took no bytes for %.1f s, aborting with "
            "%d bytes unsent",
            self.client,
            self.limits.send_timeout,
            unsent,
        )
        self._send_wait = None
        # Taken first so that ending the exchange starts no queued request.
        queue, self._queue = self._queue, []
        # A reset, because bytes of the response are left unsent, and an
        # HTTP/1.0 client reading to the close would take a FIN for its end.
        self.reset()
        if queue and self._front_started:
            queue[0].on_send_timeout()
        return True

    def _on_tunnel_deadline(self) -> None:
        # The deadline is moved only when it passes, not on every chunk, so
        # the tunnel's relay path reads the clock and nothing else.
        idle_until = self._tunnel_last + self.limits.tunnel_idle_timeout
        if self.clock() < idle_until:
            self._conn_deadline = idle_until
            self.watch_deadline(idle_until)
            return
        logger.debug("closing idle tunnel of %s", self.client)
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.end_idle_tunnel()
        else:
            self.close()

    def _end_linger(self) -> None:
        if self.transport is None:
            return
        if self.clock() >= self._conn_deadline:
            self.transport.close()
        else:
            self.watch_deadline(self._conn_deadline)

    def _on_conn_deadline(self) -> None:
        if self._conn_deadline_kind == _TUNNEL:
            self._on_tunnel_deadline()
            return
        if self._conn_deadline_kind == _HEADER and (self._in_head or self._head_bytes):
            logger.debug("header read timeout for %s", self.client)
            self._write_error(408, "request header read timed out")
        else:
            self.close()


def _unsent_bytes(transport: asyncio.Transport) -> int:
    """Return the bytes not yet taken by the client: buffered, or in the kernel.

    Only the transport's buffer counts where the kernel's send queue cannot
    be read (no SIOCOUTQ, or a socket that does not support it).
    """
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is None or not _SIOCOUTQ:
        return unsent
    try:
        queued = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, bytes(4))
    except (OSError, ValueError):
        return unsent
    return unsent + int.from_bytes(queued, sys.byteorder)
