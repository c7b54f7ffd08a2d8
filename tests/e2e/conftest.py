"""Fixtures for end-to-end tests: real upstreams and `pgproxy run` as a process.

Upstreams are in-process servers on 127.0.0.1 port 0 (see e2e_upstream);
pgproxy runs as a child process from a config written to a temporary
directory (see e2e_process). Module-scoped factories let a test module share
one pgproxy process across tests that do not interfere with each other. The
function-scoped ones give a test a fresh process when it counts connections,
measures memory or stops the process.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_process import PgproxyFactory, PgproxyProcess, start_pgproxy
from e2e_upstream import Upstream, UpstreamFactory, WebSocketUpstream

_E2E_DIR = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this directory with the `e2e` marker."""
    for item in items:
        if _E2E_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def upstream_factory() -> Iterator[UpstreamFactory]:
    """Create upstream servers that stop when the test ends."""
    with _upstreams() as factory:
        yield factory


@pytest.fixture(scope="module")
def module_upstream_factory() -> Iterator[UpstreamFactory]:
    """Create upstream servers that live for the whole test module."""
    with _upstreams() as factory:
        yield factory


class _upstreams:
    def __init__(self) -> None:
        self.created: list[Upstream] = []

    def __enter__(self) -> UpstreamFactory:
        def create(name: str = "up", rcvbuf: int | None = None) -> Upstream:
            upstream = Upstream(name, rcvbuf=rcvbuf)
            self.created.append(upstream)
            return upstream

        return create

    def __exit__(self, *exc_info: object) -> None:
        for upstream in self.created:
            upstream.stop()


@pytest.fixture
def pgproxy_factory(tmp_path: Path) -> Iterator[PgproxyFactory]:
    """Start `pgproxy run` processes that are stopped when the test ends."""
    started: list[PgproxyProcess] = []

    def create(config_text: str, *extra_args: str) -> PgproxyProcess:
        directory = tmp_path / f"pgproxy{len(started)}"
        directory.mkdir()
        process = start_pgproxy(directory, config_text, *extra_args)
        started.append(process)
        return process

    yield create
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def module_pgproxy_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PgproxyFactory]:
    """Start `pgproxy run` processes shared by a whole test module."""
    started: list[PgproxyProcess] = []

    def create(config_text: str, *extra_args: str) -> PgproxyProcess:
        directory = tmp_path_factory.mktemp("pgproxy")
        process = start_pgproxy(directory, config_text, *extra_args)
        started.append(process)
        return process

    yield create
    for process in started:
        process.stop()


@pytest.fixture
def websocket_upstream() -> Iterator[WebSocketUpstream]:
    """A WebSocket echo server on 127.0.0.1."""
    server = WebSocketUpstream()
    yield server
    server.stop()


@pytest.fixture
def dead_address() -> Iterator[str]:
    """An address on 127.0.0.1 that refuses connections.

    The port stays bound (without listen) for the test, so no other process
    can take it and connecting to it fails at once with ECONNREFUSED.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
