"""The pieces of `pgproxy demo` that run without a terminal.

Three small HTTP upstreams on 127.0.0.1 answer every request with the name
of the endpoint that served it and count what they served; `/healthz`
answers the health check without being counted. `demo_graph` rewrites the
shipped demo config onto the ports that were actually free, and
`send_requests` drives N requests through the proxy on one keep-alive
connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from importlib import resources

import httptools

from pgproxy.config.loader import parse_config
from pgproxy.config.models import Config, parse_host_port
from pgproxy.graph.build import build_graph
from pgproxy.graph.types import Graph
from pgproxy.server.listeners import bind_socket

DEMO_CONFIG = "demo.toml"


def demo_config() -> Config:
    """Load the demo config shipped inside the package."""
    text = (
        resources.files("pgproxy").joinpath("examples", DEMO_CONFIG).read_text("utf-8")
    )
    config, _ = parse_config(text, f"pgproxy/examples/{DEMO_CONFIG}")
    return config


def bind_or_any(host: str, port: int) -> tuple[socket.socket, bool]:
    """Bind host:port, or any free port when it is taken; say which happened."""
    try:
        return bind_socket(host, port), True
    except OSError:
        return bind_socket(host, 0), False


@dataclasses.dataclass
class DemoUpstream:
    """One demo endpoint: a bound socket and the requests it served."""

    sock: socket.socket
    served: int = 0
    server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """`host:port` of the endpoint."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        """Serve on the bound socket."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _DemoProtocol(self), sock=self.sock
        )

    def close(self) -> None:
        """Stop serving."""
        if self.server is not None:
            self.server.close()


class _DemoProtocol(asyncio.Protocol):
    def __init__(self, upstream: DemoUpstream) -> None:
        self.upstream = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.WriteTransport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        url, self.url = self.url, b""
        if url.startswith(b"/healthz"):
            body = b"ok\n"
        else:
            self.upstream.served += 1
            body = f"hello from {self.upstream.address}\n".encode()
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
        )
        if self.transport is not None:
            self.transport.write(head % len(body) + body)


def demo_graph(
    config: Config, listener_sock: socket.socket, upstreams: list[DemoUpstream]
) -> Graph:
    """Point the demo config at the bound listener and upstream ports."""
    host, port = listener_sock.getsockname()[:2]
    listeners = {
        name: listener.model_copy(update={"address": f"{host}:{port}"})
        for name, listener in config.listeners.items()
    }
    cluster_name, cluster = next(iter(config.clusters.items()))
    endpoints = [upstream.address for upstream in upstreams]
    clusters = {cluster_name: cluster.model_copy(update={"endpoints": endpoints})}
    server = config.server.model_copy(update={"access_log": "off"})
    updated = config.model_copy(
        update={"server": server, "listeners": listeners, "clusters": clusters}
    )
    graph, diagnostics = build_graph(updated, f"pgproxy/examples/{DEMO_CONFIG}")
    if graph is None:
        raise ValueError("; ".join(item.render() for item in diagnostics))
    return graph


def demo_addresses(config: Config) -> tuple[tuple[str, int], list[tuple[str, int]]]:
    """Return the listener address and the endpoint addresses of the demo config."""
    listener = next(iter(config.listeners.values()))
    cluster = next(iter(config.clusters.values()))
    endpoints = [parse_host_port(item.address) for item in cluster.endpoint_configs()]
    return parse_host_port(listener.address), endpoints


async def send_requests(host: str, port: int, count: int, timeout: float = 10.0) -> int:
    """Send `count` GET requests on one keep-alive connection; return the 200s."""
    reader, writer = await asyncio.open_connection(host, port)
    ok = 0
    try:
        for _ in range(count):
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await asyncio.wait_for(reader.readexactly(length), timeout)
            ok += head.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    return ok
