"""Memory of a proxy holding 1,000 idle keep-alive client connections.

Each connection sends one GET, reads the whole response and then stays open
and idle. Requests go out in batches of 50 so the check measures idle
connections, not 1,000 concurrent requests (which would also open up to
1,000 upstream connections).
"""

from __future__ import annotations

import resource
import socket
import time
from dataclasses import dataclass

from harness.processes import BenchError, Process

BATCH = 50
_REQUEST = b"GET /small HTTP/1.1\r\nHost: bench.local\r\n\r\n"


@dataclass(frozen=True, slots=True)
class IdleResult:
    """Memory of the proxy tree before and during the idle connections."""

    target: str
    connections: int
    processes: int
    rss_before_kib: int
    rss_idle_kib: int
    hwm_total_kib: int
    hwm_max_kib: int

    @property
    def per_connection_kib(self) -> float:
        """Resident memory added per idle connection."""
        return (self.rss_idle_kib - self.rss_before_kib) / self.connections


def raise_fd_limit(needed: int) -> None:
    """Raise this process's open-file soft limit to `needed` when the hard limit allows.

    Child processes inherit the limit, so the proxies can accept as many
    connections as the harness opens.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    ceiling = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
    if ceiling < needed:
        raise BenchError(
            f"open-file limit is {hard}, below the {needed} the benchmark needs; "
            "raise it with `ulimit -n` and run again"
        )


def _read_response(sock: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("proxy closed an idle-check connection before answering")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"idle-check request failed: {head.splitlines()[0]!r}")
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("proxy closed an idle-check connection mid-body")
        body += chunk


def open_idle(port: int, count: int) -> list[socket.socket]:
    """Open `count` connections, each after one complete request and response."""
    sockets: list[socket.socket] = []
    try:
        while len(sockets) < count:
            batch = [
                socket.create_connection(("127.0.0.1", port), timeout=10.0)
                for _ in range(min(BATCH, count - len(sockets)))
            ]
            sockets.extend(batch)
            for sock in batch:
                sock.sendall(_REQUEST)
            for sock in batch:
                _read_response(sock)
    except BaseException:
        close_all(sockets)
        raise
    return sockets


def close_all(sockets: list[socket.socket]) -> None:
    """Close every socket, ignoring errors of already broken ones."""
    for sock in sockets:
        try:
            sock.close()
        except OSError:
            pass


def measure_idle(target: str, process: Process, port: int, count: int) -> IdleResult:
    """Read the proxy's memory before and while `count` idle connections are open."""
    close_all(open_idle(port, 1))
    time.sleep(0.5)
    before = process.tree_memory()
    sockets = open_idle(port, count)
    try:
        # Let the proxy settle so buffers freed after the responses are gone.
        time.sleep(1.0)
        if not process.alive():
            raise BenchError(f"{target} exited while holding idle connections")
        idle = process.tree_memory()
    finally:
        close_all(sockets)
    return IdleResult(
        target=target,
        connections=count,
        processes=idle.processes,
        rss_before_kib=before.rss_total_kib,
        rss_idle_kib=idle.rss_total_kib,
        hwm_total_kib=idle.hwm_total_kib,
        hwm_max_kib=idle.hwm_max_kib,
    )
