"""Tests of the worker side of the control channel, over a real socketpair."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import pytest

from pgproxy.health.shared import (
    EndpointProbeState,
    ProbeOutcome,
    encode_outcomes,
    encode_probe_state,
)
from pgproxy.server.control import Channel
from pgproxy.server.worker import encode_config, receive_start, serve_control

pytestmark = pytest.mark.anyio

OUTCOME = ProbeOutcome("api", "127.0.0.1:8000", False, "status 500")
STATE = EndpointProbeState("api", "127.0.0.1:8000", False, 0, 2, "2 probe(s) failed")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Channel]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    supervisor_end, worker_end = await Channel.open(left), await Channel.open(right)
    yield supervisor_end, worker_end
    await supervisor_end.aclose()
    await worker_end.aclose()


class RecordingHost:
    """A `WorkerHost` that records the probe messages applied to it."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, list[Any]]] = []
        self.stopped = anyio.Event()

    def metrics_snapshot(self) -> dict[str, Any]:
        return {}

    def health_snapshot(self) -> Mapping[str, Any]:
        # Taken after the probe messages before it were applied.
        return {"applied": len(self.applied)}

    async def reload(
        self, payload: bytes, added: Mapping[str, socket.socket]
    ) -> tuple[bool, str | None, str | None]:
        return False, None, "not supported"

    def apply_probe_outcomes(self, outcomes: list[ProbeOutcome]) -> None:
        self.applied.append(("outcomes", outcomes))

    def restore_probe_state(self, states: list[EndpointProbeState]) -> None:
        self.applied.append(("state", states))

    def request_shutdown(self) -> None:
        self.stopped.set()


async def test_start_carries_probe_state(pair: tuple[Channel, Channel]) -> None:
    supervisor_end, worker_end = pair

    await supervisor_end.send(
        {
            "op": "start",
            "config": encode_config(b"graph"),
            "probe_state": encode_probe_state([STATE]),
        }
    )
    start = await receive_start(worker_end)

    assert start.payload == b"graph"
    assert start.probe_state == [STATE]


async def test_start_without_probe_state(pair: tuple[Channel, Channel]) -> None:
    supervisor_end, worker_end = pair

    await supervisor_end.send({"op": "start", "config": encode_config(b"graph")})
    start = await receive_start(worker_end)

    assert start.probe_state is None


async def test_probe_messages_applied_in_order(
    pair: tuple[Channel, Channel], caplog: pytest.LogCaptureFixture
) -> None:
    supervisor_end, worker_end = pair
    host = RecordingHost()

    async with anyio.create_task_group() as group:
        group.start_soon(serve_control, worker_end, host)
        ready, _ = await supervisor_end.receive()
        await supervisor_end.send(encode_outcomes([OUTCOME]))
        await supervisor_end.send({"op": "probes", "outcomes": [["api"]]})
        await supervisor_end.send(
            {"op": "probe_state", "state": encode_probe_state([STATE])}
        )
        await supervisor_end.send(encode_outcomes([OUTCOME, OUTCOME]))
        await supervisor_end.send({"op": "snapshot", "id": 7})
        with anyio.fail_after(10):
            reply, _ = await supervisor_end.receive()
        await supervisor_end.aclose()
        with anyio.fail_after(10):
            await host.stopped.wait()

    assert ready["op"] == "ready"
    assert reply == {"op": "snapshot", "id": 7, "metrics": {}, "health": {"applied": 3}}
    assert host.applied == [
        ("outcomes", [OUTCOME]),
        ("state", [STATE]),
        ("outcomes", [OUTCOME, OUTCOME]),
    ]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "invalid probes message" in errors[0].getMessage()
