"""Listening sockets shared by worker processes.

With several workers, each listener gets one socket per worker, all bound
to the same address with SO_REUSEPORT, so the kernel spreads new
connections evenly over the workers (Linux hashes each connection to one
socket). One socket inherited by every worker would instead let whichever
worker wakes first take most connections, and the busiest worker is often
the one that wakes first. The supervisor creates the sockets, so a bind
failure is reported once, before any worker starts, and a port 0 listener
gets one real port for all workers. A worker that crashes leaves its socket
open in the supervisor: connections queued on it wait for the replacement
instead of being reset.

Without SO_REUSEPORT every worker inherits the same single socket.

Linux lets any process of the same user join a group of SO_REUSEPORT
sockets, so a second pgproxy started on a port in use would silently take a
share of its connections. `bind_listener` therefore first binds one probe
socket without SO_REUSEPORT: it fails with "Address already in use" while
any other socket listens on the port, then it is closed and the shared
sockets are bound on the same port. Two processes starting at the same
moment can still both pass their probes in the microseconds between probe
and bind. Only a lock outside the kernel's port table would close that
window.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence

from pgproxy.graph.types import Listener
from pgproxy.server.listeners import server_ssl_context

BACKLOG = 1024
HAS_REUSEPORT = hasattr(socket, "SO_REUSEPORT")


def bind_listener(listener: Listener, count: int) -> list[socket.socket]:
    """Bind `count` sockets for a listener (one if SO_REUSEPORT is missing).

    Raises OSError naming the listener and address when a bind fails, after
    closing the sockets it had bound.
    """
    share = HAS_REUSEPORT and count > 1
    sockets: list[socket.socket] = []
    port = listener.port
    try:
        if share:
            port = _probe(listener.host, port)
        for _ in range(count if share else 1):
            sock = _bind_one(listener.host, port, reuse_port=share)
            sockets.append(sock)
            port = sock.getsockname()[1]
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise OSError(
            error.errno,
            f'could not bind listener "{listener.name}" on '
            f"{listener.settings.address}: {error.strerror or error}",
        ) from error
    if not share:
        return sockets * count
    return sockets


def bind_added(
    listeners: Sequence[Listener], count: int
) -> dict[str, list[socket.socket]]:
    """Bind the listeners a reload adds; raises OSError after closing them all."""
    added: dict[str, list[socket.socket]] = {}
    try:
        for listener in listeners:
            added[listener.name] = bind_listener(listener, count)
    except OSError:
        close_sockets(added)
        raise
    return added


def close_sockets(added: Mapping[str, Sequence[socket.socket]]) -> None:
    """Close sockets bound by `bind_added` (a shared socket once)."""
    for sockets in added.values():
        for sock in {id(item): item for item in sockets}.values():
            sock.close()


def check_tls(listeners: Sequence[Listener]) -> None:
    """Load the TLS files of `listeners`, as each worker will.

    Raises BindError naming the listener and files when one does not load.
    """
    for listener in listeners:
        server_ssl_context(listener)


def _probe(host: str, port: int) -> int:
    """Bind and close one socket without SO_REUSEPORT; return its port.

    Raises OSError (EADDRINUSE) when another socket listens on the port,
    even one with SO_REUSEPORT, because the probe does not set it.
    """
    probe = _bind_one(host, port, reuse_port=False)
    try:
        return int(probe.getsockname()[1])
    finally:
        probe.close()


def _bind_one(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def bound_address(sock: socket.socket) -> str:
    """Return the `host:port` a socket is bound to, an IPv6 host in brackets."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
