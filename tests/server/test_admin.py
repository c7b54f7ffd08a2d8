"""Tests of the admin listener over real loopback sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import h11
import pytest

from pgproxy.server.admin import MAX_CONNECTIONS, AdminServer, AdminSources

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _State:
    def __init__(self) -> None:
        self.draining = False

    async def metrics(self) -> bytes:
        return b"# HELP x test\n# TYPE x counter\nx_total 1.0\n"

    async def status(self) -> Mapping[str, Any]:
        return {"config": {"hash": "abc"}}


@pytest.fixture
async def admin() -> AsyncIterator[tuple[str, _State]]:
    state = _State()
    server = AdminServer(
        "127.0.0.1:0",
        AdminSources(
            metrics=state.metrics, status=state.status, draining=lambda: state.draining
        ),
    )
    address = server.bind()
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve)
        yield address, state
        group.cancel_scope.cancel()


async def _exchange(address: str, raw: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    chunks = []
    with anyio.fail_after(5):
        async with await anyio.connect_tcp(host, int(port)) as stream:
            await stream.send(raw)
            while True:
                try:
                    chunks.append(await stream.receive())
                except anyio.EndOfStream:
                    break
    return b"".join(chunks)


async def _get(address: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    raw = f"{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target=path, headers=[("Host", "a")]))
    client.receive_data(await _exchange(address, raw))
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        else:
            break
    return response.status_code, body


async def test_healthz_ok_then_draining(admin: tuple[str, _State]) -> None:
    address, state = admin

    assert await _get(address, "/healthz") == (200, b"ok\n")
    state.draining = True
    assert await _get(address, "/healthz") == (503, b"draining\n")


async def test_metrics_body(admin: tuple[str, _State]) -> None:
    status, body = await _get(admin[0], "/metrics")

    assert status == 200
    assert b"x_total 1.0" in body


async def test_status_json(admin: tuple[str, _State]) -> None:
    status, body = await _get(admin[0], "/status?verbose=1")

    assert status == 200
    assert json.loads(body) == {"config": {"hash": "abc"}}


async def test_head_has_no_body(admin: tuple[str, _State]) -> None:
    status, body = await _get(admin[0], "/healthz", method="HEAD")

    assert status == 200
    assert body == b""


async def test_unknown_path_404(admin: tuple[str, _State]) -> None:
    status, _ = await _get(admin[0], "/nope")

    assert status == 404


async def test_post_405(admin: tuple[str, _State]) -> None:
    raw = b"POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"

    reply = await _exchange(
        admin[0], raw + b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )

    assert reply.startswith(b"HTTP/1.1 405 ")
    assert b"allow: get, head" in reply.lower()
    assert b"HTTP/1.1 404 " in reply  # the pipelined request was answered too


async def test_malformed_request_400(admin: tuple[str, _State]) -> None:
    reply = await _exchange(admin[0], b"GET /healthz HTTP/1.1\r\nHost : a\r\n\r\n")

    assert reply.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in reply.lower()


async def test_oversized_headers_rejected(admin: tuple[str, _State]) -> None:
    raw = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"

    reply = await _exchange(admin[0], raw)

    assert reply.startswith(b"HTTP/1.1 431 ")


async def test_keep_alive_two_requests(admin: tuple[str, _State]) -> None:
    raw = (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )

    reply = await _exchange(admin[0], raw)

    assert reply.count(b"HTTP/1.1 200 ") == 2


async def test_bind_busy_port_raises(admin: tuple[str, _State]) -> None:
    busy = AdminServer(admin[0], AdminSources(_State().metrics, _State().status, bool))

    with pytest.raises(OSError):
        busy.bind()


async def test_connection_over_limit_gets_503(admin: tuple[str, _State]) -> None:
    address, _ = admin
    host, _, port = address.rpartition(":")
    idle = [await anyio.connect_tcp(host, int(port)) for _ in range(MAX_CONNECTIONS)]
    try:
        await anyio.sleep(0.2)  # let the server accept every one of them
        reply = await _exchange(address, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    finally:
        for stream in idle:
            await stream.aclose()

    assert reply.startswith(b"HTTP/1.1 503 ")
    assert await _get(address, "/healthz") == (200, b"ok\n")
