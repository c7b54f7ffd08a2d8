"""Loopback upstream servers with scripted behaviour, for health tests.

All servers of a `ServerFarm` run on one asyncio loop in a background thread,
so both async tests and synchronous CLI tests can use them. Every listener
binds 127.0.0.1 port 0. A server's `mode` can change while it runs:

- "ok": respond to every request with 200 and the body "ok";
- "status:N": respond to every request with status N;
- "hang": accept the connection, read, and never answer;
- "garbage": send bytes that are not HTTP on connect, close after a request.

A server whose `health_mode` is set uses it only for `health_path`, so the
health path can fail while other paths still serve.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import threading
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

GARBAGE = b"SSH-2.0-OpenSSH_9.2\r\nthis is not an HTTP response\r\n\r\n"


@dataclass
class Server:
    """One listening upstream and what it has received."""

    port: int
    mode: str = "ok"
    health_path: str = "/healthz"
    health_mode: str | None = None
    requests: Counter[str] = field(default_factory=Counter)
    host_headers: list[str] = field(default_factory=list)
    connections: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def mode_for(self, path: str) -> str:
        if path == self.health_path and self.health_mode is not None:
            return self.health_mode
        return self.mode


class ServerFarm:
    """Many scripted servers on one asyncio loop in a background thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def add(self, mode: str = "ok", *, tls: ssl.SSLContext | None = None) -> Server:
        """Start a server in `mode`, optionally speaking TLS, and return it."""
        future = asyncio.run_coroutine_threadsafe(self._start(mode, tls), self._loop)
        return future.result(timeout=10)

    def close(self) -> None:
        """Close every listener and connection, then stop the loop."""
        future = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        future.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        # A TLS connection still in its handshake has no handler yet, so its
        # transport is only closed when collected; collect it here, quietly.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()

    async def _start(self, mode: str, tls: ssl.SSLContext | None) -> Server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = Server(port=sock.getsockname()[1], mode=mode)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            await self._serve(server, reader, writer)

        listener = await asyncio.start_server(handle, sock=sock, ssl=tls, backlog=512)
        self._servers.append(listener)
        return server

    async def _serve(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        server.connections += 1
        try:
            if server.mode == "garbage":
                # Like an SSH or SMTP server: a banner before any request.
                writer.write(GARBAGE)
                await writer.drain()
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path, host = _parse_head(head)
                server.requests[path] += 1
                server.host_headers.append(host)
                if not await _respond(server.mode_for(path), reader, writer):
                    break
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()

    async def _close(self) -> None:
        for listener in self._servers:
            listener.close()
        # A connection accepted just before the close has its handler task
        # created but not started; a few loop turns let it register.
        for _ in range(3):
            await asyncio.sleep(0)
        # Closing each transport ends the handlers' reads with EOF, so no
        # handler task is left pending or has to be cancelled.
        while self._handlers:
            handlers = list(self._handlers)
            for writer in list(self._writers):
                writer.close()
            await asyncio.gather(*handlers, return_exceptions=True)
        for listener in self._servers:
            await listener.wait_closed()


def _parse_head(head: bytes) -> tuple[str, str]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    path = parts[1] if len(parts) > 1 else ""
    host = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "host":
            host = value.strip()
    return path, host


async def _respond(
    mode: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """Send the response of `mode`; return whether the connection stays open."""
    if mode == "hang":
        while await reader.read(65536):  # until the client or the farm closes
            pass
        return False
    if mode == "garbage":
        return False
    status = 200 if mode == "ok" else int(mode.removeprefix("status:"))
    body = b"ok" if mode == "ok" else b"failing"
    writer.write(
        b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n%b"
        % (status, len(body), body)
    )
    await writer.drain()
    return True


def refused_port() -> int:
    """Return a loopback port that had a listener a moment ago, now closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def unaccepting_listener() -> Iterator[int]:
    """Yield the port of a listener whose accept queue is full.

    Linux drops SYNs to a listener whose accept queue is full, so a further
    connect stays pending until the client gives up: a TCP connect timeout
    on loopback, without any other host.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@contextmanager
def server_farm() -> Iterator[ServerFarm]:
    """Run a `ServerFarm` for the duration of the block."""
    farm = ServerFarm()
    try:
        yield farm
    finally:
        farm.close()
