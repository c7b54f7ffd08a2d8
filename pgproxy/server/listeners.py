"""Listening sockets, created by pgproxy itself before the event loop serves.

Creating the sockets here (instead of inside the event loop's server) lets
every listener be bound, and every bind failure reported, before anything
starts, and lets worker processes share one socket each (SO_REUSEPORT).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from pgproxy.errors import PgproxyError
from pgproxy.graph.settings import TlsSettings
from pgproxy.graph.types import Cluster, Graph, Listener

BACKLOG = 1024


class BindError(PgproxyError):
    """A listener could not be bound or its TLS files could not be loaded."""


@dataclass(slots=True)
class BoundListener:
    """A listener with its bound socket and, for TLS, its server context."""

    listener: Listener
    sock: socket.socket
    ssl_context: ssl.SSLContext | None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when configured as 0)."""
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def describe(self) -> str:
        """Return `host:port`, bracketing an IPv6 host."""
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """Create a non-blocking listening TCP socket on host:port."""
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class EncryptedKeyError(ssl.SSLError):
    """A TLS private key is encrypted, and pgproxy has no passphrase for it."""


def _raise_encrypted_key() -> str:
    # Without a callback OpenSSL prompts on the terminal, and each process
    # that loads the key (supervisor, every worker, every reload) would ask.
    raise EncryptedKeyError("the private key is encrypted with a passphrase")


def load_certificate(context: ssl.SSLContext, tls: TlsSettings) -> None:
    """Load the certificate chain and private key of `tls` into `context`.

    Raises OSError when a file cannot be read, EncryptedKeyError for a key
    with a passphrase, and ssl.SSLError for any other file that OpenSSL
    rejects (not PEM, or a key that does not match the certificate).
    """
    context.load_cert_chain(
        tls.certificate, tls.private_key, password=_raise_encrypted_key
    )


def tls_server_context(tls: TlsSettings) -> ssl.SSLContext:
    """Build a server TLS context with the certificate and key of `tls`.

    Raises what load_certificate raises.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_certificate(context, tls)
    return context


def server_ssl_context(listener: Listener) -> ssl.SSLContext | None:
    """Build the TLS context of a listener with `tls`, or return None."""
    tls = listener.settings.tls
    if tls is None:
        return None
    try:
        context = tls_server_context(tls)
    except (OSError, ssl.SSLError) as exc:
        raise BindError(
            f'listener "{listener.name}": cannot load TLS certificate '
            f'"{tls.certificate}" or key "{tls.private_key}": {exc}'
        ) from None
    return context


def check_ca_files(clusters: Iterable[Cluster]) -> None:
    """Load the `tls_ca_file` of each cluster with https endpoints.

    The pool loads it again at the first https connection, and whenever the
    file changes. Loading it here makes a missing or broken file stop
    start-up, or fail a reload, instead of failing requests later. Raises
    BindError naming the cluster and the file.
    """
    for cluster in clusters:
        ca_file = cluster.settings.tls_ca_file
        if ca_file is None or not any(item.tls for item in cluster.endpoints):
            continue
        try:
            ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise BindError(
                f'cluster "{cluster.name}": cannot load tls_ca_file "{ca_file}": {exc}'
            ) from None


def bind_listeners(graph: Graph, *, reuse_port: bool = False) -> list[BoundListener]:
    """Bind every listener of the graph, or close them all and raise BindError."""
    bound: list[BoundListener] = []
    try:
        for listener in graph.listeners.values():
            context = server_ssl_context(listener)
            try:
                sock = bind_socket(listener.host, listener.port, reuse_port=reuse_port)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise BindError(
                    f'cannot bind listener "{listener.name}" to '
                    f"{listener.settings.address}: {reason}"
                ) from None
            bound.append(BoundListener(listener, sock, context))
    except BaseException:
        for item in bound:
            item.sock.close()
        raise
    return bound
