"""In-process helpers for protocol tests: a scripted upstream and a proxy.

The upstream is a small asyncio server on 127.0.0.1 port 0 that records
every connection and request head it reads. The proxy is `serve()` on a
graph built from a config dict, stopped through its shutdown trigger.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from pgproxy.config.models import Config
from pgproxy.graph.build import build_graph
from pgproxy.graph.types import Graph
from pgproxy.proxy.service import ProxyService
from pgproxy.server.listeners import bind_listeners
from pgproxy.server.runtime import serve

Reply = Callable[[bytes], Awaitable[bytes | None]]


async def ok_reply(head: bytes) -> bytes | None:
    """Answer every request with a 2-byte body."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class ScriptedUpstream:
    """Reads request heads (and Content-Length bodies), answers with `reply`."""

    reply: Reply = ok_reply
    heads: list[bytes] = field(default_factory=list)
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
        for writer in self.writers:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self.server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = _content_length(head)
                if length:
                    await reader.readexactly(length)
                answer = await self.reply(head)
                if answer is None:
                    writer.close()
                    return
                writer.write(answer)
                await writer.drain()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def make_graph(upstream_ports: list[int], **cluster: Any) -> Graph:
    """Build a one-listener, one-cluster graph on 127.0.0.1 port 0."""
    config = Config.model_validate(
        {
            "server": {"access_log": "off", "drain_timeout": "2s"},
            "listeners": {
                "main": {"address": "127.0.0.1:0", "header_read_timeout": "2s"}
            },
            "routes": [
                {"path_prefix": "/fixed", "respond": {"status": 200, "body": "fixed"}},
                {"cluster": "app"},
            ],
            "clusters": {
                "app": {
                    "endpoints": [f"127.0.0.1:{port}" for port in upstream_ports],
                    **cluster,
                }
            },
        }
    )
    graph, diagnostics = build_graph(config, "test.toml")
    assert graph is not None, [item.render() for item in diagnostics]
    return graph


@contextlib.asynccontextmanager
async def running_proxy(graph: Graph) -> AsyncIterator[tuple[int, ProxyService]]:
    """Serve `graph` in a task; yield its port and service; stop it exactly."""
    stop = anyio.Event()
    ready = anyio.Event()
    services: list[ProxyService] = []
    bound = bind_listeners(graph)

    def on_ready(service: ProxyService, listeners: Any) -> None:
        services.append(service)
        ready.set()

    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: serve(
                graph, shutdown_trigger=stop.wait, listeners=bound, on_ready=on_ready
            )
        )
        with anyio.fail_after(5):
            await ready.wait()
        try:
            yield bound[0].address[1], services[0]
        finally:
            stop.set()


async def exchange(port: int, data: bytes, *, until_close: bool = False) -> bytes:
    """Send raw bytes to the proxy and read the reply (one response, or until close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        with anyio.fail_after(5):
            if until_close:
                return await reader.read(-1)
            return await read_response(reader)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """Read one Content-Length framed response (head and body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = _content_length(head)
    return head + (await reader.readexactly(length) if length else b"")


async def wait_for_zero(count: Callable[[], int], tries: int = 500) -> int:
    """Poll `count` every 10 ms until it returns 0; return its last value.

    connection_lost runs a few loop iterations after a close, so a test
    that counts live connections waits for it, at most `tries` times.
    """
    value = count()
    for _ in range(tries):
        if not value:
            break
        await asyncio.sleep(0.01)
        value = count()
    return value
