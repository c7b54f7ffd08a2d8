"""Per-endpoint keep-alive pools of upstream connections, and connecting.

Invariants:
- A connection is in exactly one place: owned by one exchange, idle in its
  endpoint's pool, or closed. Pools are LIFO stacks, so the most recently
  used connection (the one least likely to have been closed by the
  upstream) is reused first and idle ones expire from the bottom.
- A pooled connection is checked for a pending EOF or stray bytes before
  reuse, so a connection the upstream already closed is replaced before any
  byte of a request is written to it. EOF and bytes the loop has read mark
  the connection at once. A connection idle for a while is also peeked at
  (MSG_PEEK) for what arrived since the loop last polled.
- Connect, DNS and TLS handshake errors become an UpstreamError with
  `bytes_sent=False`, which tells the retry policy that no byte of the
  request reached the upstream.
- With `max_active` set, connections in use, opening, or reserved for a
  woken waiter never exceed it. Waiters are served first come, first
  served: while one waits, a new request waits behind it, and each slot
  that frees up is reserved for the oldest waiter before its task runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable

from pgproxy.errors import EndpointBusyError, UpstreamError
from pgproxy.graph.types import Endpoint
from pgproxy.proxy.response_head import FieldLayout
from pgproxy.proxy.upstream import MAX_RESPONSE_HEAD, UpstreamConnection

logger = logging.getLogger(__name__)


class EndpointPool:
    """Idle keep-alive connections to one endpoint, most recently used on top.

    `active` counts connections handed out and not yet returned or closed,
    `opening` connections being opened. `max_active` (0: no limit) caps
    their sum, and `wait_for_slot` waits for room under it. Expiry runs
    from one timer per pool, armed only while connections idle.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        idle_timeout: float,
        max_idle: int,
        ssl_context: Callable[[str | None], ssl.SSLContext],
    ) -> None:
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.active = 0
        self.opening = 0
        self.opened = 0
        self.max_active = 0
        # Slots held for woken waiters whose tasks have not run yet.
        self._reserved = 0
        # A list, not a deque: compiled code tests a list's truth inline.
        self._waiters: list[asyncio.Future[None]] = []
        self.max_response_head = MAX_RESPONSE_HEAD
        # Field names of the endpoint's last response head (response_head.py).
        self.layout = FieldLayout()
        # CA file verifying https:// endpoints; None means the system store.
        self.tls_ca_file: str | None = None
        self._ssl_context = ssl_context
        self._idle: list[UpstreamConnection] = []
        self._timer: asyncio.TimerHandle | None = None
        # The loop the pool's connections live on, taken at the first release
        # (asyncio.get_running_loop costs a getpid(2) per call on Linux).
        self._loop: asyncio.AbstractEventLoop | None = None
        # Its time method, bound once: compiled code looks a method of a
        # Python object up by name on every call.
        self._clock: Callable[[], float] | None = None

    def __repr__(self) -> str:
        return (
            f"<EndpointPool {self.endpoint.address} idle={len(self._idle)} "
            f"active={self.active} opened={self.opened}>"
        )

    @property
    def idle(self) -> int:
        """Number of idle connections."""
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Number of requests waiting for a connection slot."""
        return len(self._waiters)

    def full(self) -> bool:
        """Return whether a new request must wait for a connection slot."""
        if not self.max_active:
            return False
        used = self.active + self.opening + self._reserved
        return used >= self.max_active or bool(self._waiters)

    async def wait_for_slot(self, timeout: float) -> None:
        """Wait until a connection slot is reserved for the caller.

        The caller then takes the slot in the same step, with `acquire` or
        `connect`, after `end_reservation`. Raises EndpointBusyError when no
        slot frees up within `timeout` seconds.
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                # Woken and then cancelled or timed out: pass the slot on.
                self.end_reservation()
                self.wake()
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise EndpointBusyError(
                    f"no connection to {self.endpoint.address} became free within "
                    f"{timeout:g}s (max_connections = {self.max_active})",
                    endpoint=self.endpoint.address,
                ) from None
            raise

    def begin_connect(self) -> None:
        """Count a new connection as opening; `connect` or `cancel_connect` follows.

        The count starts before the task that runs `connect` does, so that
        a request handled in the same event loop iteration finds the slot
        taken.
        """
        self.opening += 1

    def cancel_connect(self) -> None:
        """Count down a connection from `begin_connect` that `connect` never opened."""
        self.opening -= 1
        if self._waiters:
            self.wake()

    def close_acquired(self, conn: UpstreamConnection) -> None:
        """Close a connection from `acquire` and keep its slot for the caller.

        The caller takes the slot in the same step with `begin_connect`.
        """
        self.active -= 1
        conn.close()

    def end_reservation(self) -> None:
        """Give up the slot reserved for a woken waiter (taken or passed on)."""
        self._reserved -= 1

    def wake(self) -> None:
        """Reserve free slots for the oldest waiters and wake them."""
        waiters = self._waiters
        while waiters:
            limit = self.max_active
            if limit and self.active + self.opening + self._reserved >= limit:
                return
            waiter = waiters.pop(0)
            if not waiter.done():
                self._reserved += 1
                waiter.set_result(None)

    def acquire(self) -> UpstreamConnection | None:
        """Pop the newest usable idle connection, closing stale ones on the way."""
        idle = self._idle
        if not idle:
            return None
        now = self._loop_time()
        while idle:
            conn = idle.pop()
            if conn.is_reusable(now - conn.idle_since):
                conn.reused += 1
                self.active += 1
                return conn
            logger.debug("closing stale pooled connection to %s", conn.endpoint)
            conn.close()
        return None

    def _loop_time(self) -> float:
        clock = self._clock
        if clock is None:
            loop = self._loop = asyncio.get_running_loop()
            clock = self._clock = loop.time
        return clock()

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection after a complete exchange, or close it."""
        self.active -= 1
        conn.exchange = None
        if conn.closed or not conn.keep_alive or len(self._idle) >= self.max_idle:
            conn.close()
            if self._waiters:
                self.wake()
            return
        # A connection paused for a slow client must read again while idle, to
        # see the upstream's EOF and to read the next response.
        if conn.reading_paused:
            conn.resume_reading()
        conn.idle_since = self._loop_time()
        self._idle.append(conn)
        loop = self._loop
        if self._timer is None and loop is not None:
            self._timer = loop.call_at(
                conn.idle_since + self.idle_timeout, self._expire
            )
        if self._waiters:
            self.wake()

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget a connection that closed while idle."""
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def forget_active(self) -> None:
        """Count down a connection handed out that will not come back."""
        self.active -= 1
        if self._waiters:
            self.wake()

    def close_idle(self) -> None:
        """Close every idle connection (shutdown, or endpoint removed)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() - self.idle_timeout
        idle = self._idle
        while idle and idle[0].idle_since <= deadline:
            idle.pop(0).close()
        if idle:
            when = idle[0].idle_since + self.idle_timeout
            self._timer = loop.call_at(when, self._expire)

    async def connect(self, timeout: float) -> UpstreamConnection:
        """Open a new connection within `timeout` seconds, after `begin_connect`.

        Raises UpstreamError with `bytes_sent=False`: 502 with flag
        connect_failure, or 504 with flag connect_timeout.
        """
        endpoint = self.endpoint
        try:
            async with asyncio.timeout(timeout):
                conn = await self._open()
            # Counted as active before it stops counting as opening, so
            # that the wake below does not hand its slot to a waiter.
            self.active += 1
            self.opened += 1
        except TimeoutError:
            raise UpstreamError(
                f"connect to {endpoint.address} timed out after {timeout:g}s",
                endpoint=endpoint.address,
                status=504,
                flag="connect_timeout",
                retryable=True,
                bytes_sent=False,
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(
                f"connect to {endpoint.address} failed: {_describe(exc)}",
                endpoint=endpoint.address,
                status=502,
                flag="connect_failure",
                retryable=True,
                bytes_sent=False,
            ) from None
        finally:
            self.opening -= 1
            if self._waiters:
                self.wake()
        return conn

    async def _open(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        infos = await loop.getaddrinfo(
            endpoint.host, endpoint.port, type=socket.SOCK_STREAM
        )
        error: OSError = OSError(f"no address found for {endpoint.host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await loop.sock_connect(sock, address)
                return await self._wrap(sock)
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error

    async def _wrap(self, sock: socket.socket) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        context = self._ssl_context(self.tls_ca_file) if endpoint.tls else None
        _, conn = await loop.create_connection(
            lambda: UpstreamConnection(endpoint, self),
            sock=sock,
            ssl=context,
            server_hostname=endpoint.host if context is not None else None,
        )
        conn.sock = sock
        return conn


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup failed ({exc.strerror})"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({exc.verify_message})"
    return str(exc) or type(exc).__name__


class Pools:
    """Every endpoint's pool, keyed by endpoint address, kept across reloads."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str, str], EndpointPool] = {}
        # TLS client contexts by (CA file, its mtime in ns); (None, 0) is the
        # system trust store.
        self._ssl: dict[tuple[str | None, int], ssl.SSLContext] = {}

    def __repr__(self) -> str:
        idle = sum(pool.idle for pool in self._pools.values())
        active = sum(pool.active for pool in self._pools.values())
        return f"<Pools endpoints={len(self._pools)} idle={idle} active={active}>"

    def get(
        self, endpoint: Endpoint, idle_timeout: float, max_idle: int
    ) -> EndpointPool:
        """Return the endpoint's pool, creating it on first use."""
        key = (endpoint.cluster, endpoint.address)
        pool = self._pools.get(key)
        if pool is None:
            pool = EndpointPool(endpoint, idle_timeout, max_idle, self._ssl_context)
            self._pools[key] = pool
        return pool

    def retire(self, cluster: str, address: str) -> int:
        """Drop the pool of an endpoint that a reload removed.

        Its idle connections close now; connections in use close when they
        are released, because the pool keeps no idle connection any more.
        Returns how many idle connections were closed.
        """
        pool = self._pools.pop((cluster, address), None)
        if pool is None:
            return 0
        closed = pool.idle
        pool.max_idle = 0
        pool.close_idle()
        # Waiters go ahead as requests already sent to the endpoint do.
        pool.max_active = 0
        pool.wake()
        return closed

    def all(self) -> list[EndpointPool]:
        """Return every pool."""
        return list(self._pools.values())

    def close_idle(self) -> int:
        """Close every idle connection of every pool; return how many closed."""
        count = 0
        for pool in self._pools.values():
            count += pool.idle
            pool.close_idle()
        return count

    def _ssl_context(self, ca_file: str | None) -> ssl.SSLContext:
        """Return the context verifying upstream certificates against `ca_file`.

        The file is read again when its modification time changes, so a
        rotated CA file applies to new connections without a reload. Raises
        OSError naming the file when it cannot be loaded.
        """
        try:
            key = (ca_file, os.stat(ca_file).st_mtime_ns if ca_file else 0)
            context = self._ssl.get(key)
            if context is None:
                context = ssl.create_default_context(cafile=ca_file)
                self._ssl = {k: v for k, v in self._ssl.items() if k[0] != ca_file}
                self._ssl[key] = context
        except (OSError, ssl.SSLError) as exc:
            raise OSError(f'cannot load tls_ca_file "{ca_file}": {exc}') from exc
        return context
