"""Tests of the listening sockets shared by worker processes."""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Iterator

import pytest

from pgproxy.config.models import ListenerConfig
from pgproxy.graph.settings import ListenerSettings, settings_from_config
from pgproxy.graph.types import Listener
from pgproxy.server.sockets import HAS_REUSEPORT, bind_listener, bound_address


def _listener(address: str = "127.0.0.1:0") -> Listener:
    host, _, port = address.rpartition(":")
    settings = settings_from_config(ListenerSettings, ListenerConfig(address=address))
    return Listener("main", host, int(port), settings)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    created: list[socket.socket] = []
    yield created
    for sock in created:
        sock.close()


@pytest.mark.skipif(not HAS_REUSEPORT, reason="needs SO_REUSEPORT")
def test_port_zero_gives_one_port(sockets: list[socket.socket]) -> None:
    sockets.extend(bind_listener(_listener(), 3))

    ports = {sock.getsockname()[1] for sock in sockets}

    assert len(sockets) == 3
    assert len({id(sock) for sock in sockets}) == 3
    assert len(ports) == 1
    assert ports != {0}


def test_one_worker_one_socket(sockets: list[socket.socket]) -> None:
    sockets.extend(bind_listener(_listener(), 1))

    assert len(sockets) == 1
    assert bound_address(sockets[0]).startswith("127.0.0.1:")


def test_bind_failure_names_listener(sockets: list[socket.socket]) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    sockets.append(busy)
    address = f"127.0.0.1:{busy.getsockname()[1]}"

    with pytest.raises(OSError, match=r'listener "main" on 127\.0\.0\.1:'):
        bind_listener(_listener(address), 2)


@pytest.mark.skipif(not HAS_REUSEPORT, reason="needs SO_REUSEPORT")
def test_reuseport_group_in_use_rejected(sockets: list[socket.socket]) -> None:
    # Another process's SO_REUSEPORT sockets would accept ours into their
    # group, splitting connections between two instances.
    sockets.extend(bind_listener(_listener(), 2))
    address = bound_address(sockets[0])

    with pytest.raises(OSError, match="in use") as raised:
        bind_listener(_listener(address), 2)

    assert raised.value.errno == errno.EADDRINUSE


@pytest.mark.skipif(not HAS_REUSEPORT, reason="needs SO_REUSEPORT")
def test_kernel_spreads_connections(sockets: list[socket.socket]) -> None:
    sockets.extend(bind_listener(_listener(), 2))
    port = sockets[0].getsockname()[1]
    clients = []
    for _ in range(64):
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        clients.append(client)
    accepted = [0, 0]
    for index, sock in enumerate(sockets):
        sock.setblocking(False)
        while select.select([sock], [], [], 0.2)[0]:
            conn, _ = sock.accept()
            conn.close()
            accepted[index] += 1
    for client in clients:
        client.close()

    assert sum(accepted) == 64
    # Linux hashes each connection's 4-tuple to a socket; 64 connections
    # give each socket at least one with overwhelming probability.
    assert min(accepted) >= 1
