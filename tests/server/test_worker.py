"""Tests of the worker side of the control channel, over a real socketpair."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from pgproxy.config.models import ClusterConfig
from pgproxy.graph.settings import ClusterSettings, settings_from_config
from pgproxy.graph.types import Cluster, Endpoint
from pgproxy.health.reports import (
    EndpointOutcomes,
    OutcomeReport,
    ReportingHealthTable,
    decode_report,
)
from pgproxy.health.shared import (
    Ejection,
    EndpointProbeState,
    ProbeOutcome,
    encode_ejections,
    encode_outcomes,
    encode_probe_state,
)
from pgproxy.server.control import Channel
from pgproxy.server.worker import (
    ReportSender,
    encode_config,
    receive_start,
    serve_control,
)

pytestmark = pytest.mark.anyio

OUTCOME = ProbeOutcome("api", "127.0.0.1:8000", False, "status 500")
STATE = EndpointProbeState("api", "127.0.0.1:8000", False, 0, 2, "2 probe(s) failed")
EJECTION = Ejection("api", "127.0.0.1:8000", 30.0, "5 failures in a row")


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

    def apply_ejections(self, ejections: list[Ejection]) -> None:
        self.applied.append(("ejections", ejections))

    def request_shutdown(self) -> None:
        self.stopped.set()


async def test_start_carries_probe_state(pair: tuple[Channel, Channel]) -> None:
    supervisor_end, worker_end = pair

    await supervisor_end.send(
        {
            "op": "start",
            "config": encode_config(b"graph"),
            "probe_state": encode_probe_state([STATE]),
            "ejections": encode_ejections([EJECTION]),
        }
    )
    start = await receive_start(worker_end)

    assert start.payload == b"graph"
    assert start.probe_state == [STATE]
    assert start.ejections == [EJECTION]


async def test_start_without_probe_state(pair: tuple[Channel, Channel]) -> None:
    supervisor_end, worker_end = pair

    await supervisor_end.send({"op": "start", "config": encode_config(b"graph")})
    start = await receive_start(worker_end)

    assert start.probe_state is None
    assert start.ejections == []


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
        await supervisor_end.send(
            {"op": "ejections", "ejections": encode_ejections([EJECTION])}
        )
        await supervisor_end.send({"op": "snapshot", "id": 7})
        with anyio.fail_after(10):
            reply, _ = await supervisor_end.receive()
        await supervisor_end.aclose()
        with anyio.fail_after(10):
            await host.stopped.wait()

    assert ready["op"] == "ready"
    assert reply == {"op": "snapshot", "id": 7, "metrics": {}, "health": {"applied": 4}}
    assert host.applied == [
        ("outcomes", [OUTCOME]),
        ("state", [STATE]),
        ("outcomes", [OUTCOME, OUTCOME]),
        ("ejections", [EJECTION]),
    ]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "invalid probes message" in errors[0].getMessage()


# ReportSender.


def reporting_table(report: OutcomeReport) -> tuple[ReportingHealthTable, Endpoint]:
    config = ClusterConfig(endpoints=["127.0.0.1:8000", "127.0.0.1:8001"])
    endpoints = tuple(
        Endpoint(address, "127.0.0.1", int(address[-4:]), False, 1, "api")
        for address in config.endpoints
    )
    cluster = Cluster("api", endpoints, settings_from_config(ClusterSettings, config))
    return ReportingHealthTable({"api": cluster}, lambda: 0.0, report), endpoints[0]


async def test_sender_batches_outcomes(pair: tuple[Channel, Channel]) -> None:
    supervisor_end, worker_end = pair
    report = OutcomeReport()
    table, endpoint = reporting_table(report)
    sender = ReportSender(report, delay=0.05)

    async with anyio.create_task_group() as group:
        group.start_soon(sender.run, worker_end)
        for _ in range(100):
            table.record_success(endpoint)
        table.record_failure(endpoint, "http_503")
        table.record_failure(endpoint, "http_503")
        with anyio.fail_after(10):
            message, _ = await supervisor_end.receive()
        table.record_failure(endpoint, "connect_failure")
        with anyio.fail_after(10):
            later, _ = await supervisor_end.receive()
        group.cancel_scope.cancel()

    # The outcomes recorded before the delay ran out share one message.
    assert decode_report(message) == [
        EndpointOutcomes("api", endpoint.address, ((0, ""), (2, "http_503")))
    ]
    assert decode_report(later) == [
        EndpointOutcomes("api", endpoint.address, ((1, "connect_failure"),))
    ]
    assert sender.sent == 2


async def test_sender_sends_full_report_at_once(
    pair: tuple[Channel, Channel],
) -> None:
    supervisor_end, worker_end = pair
    report = OutcomeReport(max_runs=6)
    table, endpoint = reporting_table(report)
    # A delay this long never runs out within the test's deadline.
    sender = ReportSender(report, delay=3600)

    async with anyio.create_task_group() as group:
        group.start_soon(sender.run, worker_end)
        await anyio.lowlevel.checkpoint()  # the sender waits for the first outcome
        for _ in range(3):
            table.record_success(endpoint)
            table.record_failure(endpoint, "http_503")
        with anyio.fail_after(10):
            message, _ = await supervisor_end.receive()
        group.cancel_scope.cancel()

    [outcomes] = decode_report(message)
    assert len(outcomes.runs) == 6
    assert len(report) == 0


async def test_sender_stops_when_channel_closes(
    pair: tuple[Channel, Channel],
) -> None:
    supervisor_end, worker_end = pair
    report = OutcomeReport()
    table, endpoint = reporting_table(report)
    sender = ReportSender(report, delay=0.01)
    await supervisor_end.aclose()

    table.record_failure(endpoint, "http_503")
    with anyio.fail_after(10):
        await sender.run(worker_end)

    assert sender.sent == 0
