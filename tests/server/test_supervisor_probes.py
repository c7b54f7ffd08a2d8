"""Tests of the supervisor's shared probes and the feeds to its workers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import pgproxy.server.supervisor_probes as supervisor_probes
from pgproxy.config.models import (
    ClusterConfig,
    Config,
    HealthCheckConfig,
    split_endpoint_address,
)
from pgproxy.graph.settings import ClusterSettings, ServerSettings, settings_from_config
from pgproxy.graph.types import Cluster, Endpoint, Graph
from pgproxy.health.shared import (
    EndpointProbeState,
    ProbeOutcome,
    decode_outcomes,
    decode_probe_state,
)
from pgproxy.server.control import Channel, Message
from pgproxy.server.supervisor_probes import ProbeFeed, SharedProbes
from tests.health.servers import ServerFarm, server_farm

pytestmark = pytest.mark.anyio

STATE = [EndpointProbeState("api", "127.0.0.1:1", False, 0, 3, "refused")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def farm() -> Iterator[ServerFarm]:
    with server_farm() as farm:
        yield farm


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Channel]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    supervisor_end, worker_end = await Channel.open(left), await Channel.open(right)
    yield supervisor_end, worker_end
    await supervisor_end.aclose()
    await worker_end.aclose()


def outcome(index: int, ok: bool = False) -> ProbeOutcome:
    return ProbeOutcome("api", f"127.0.0.1:{index}", ok, f"probe {index}")


def make_graph(addresses: list[str]) -> Graph:
    config = ClusterConfig(
        endpoints=addresses,
        # One probe at start: later rounds are an hour away.
        health_check=HealthCheckConfig(
            path="/healthz",
            interval="1h",
            timeout="2s",
            unhealthy_threshold=1,
            healthy_threshold=1,
        ),
    )
    endpoints = []
    for address in addresses:
        tls, host, port = split_endpoint_address(address)
        endpoints.append(Endpoint(address, host, port, tls, 1, "api"))
    cluster = Cluster(
        "api", tuple(endpoints), settings_from_config(ClusterSettings, config)
    )
    server = settings_from_config(ServerSettings, Config(listeners={}).server)
    return Graph(server, "test.toml", {}, {"api": cluster}, (), router=None)  # type: ignore[arg-type]


async def receive_outcomes(channel: Channel, count: int) -> list[ProbeOutcome]:
    """Receive `probes` messages until `count` outcomes have arrived."""
    received: list[ProbeOutcome] = []
    with anyio.fail_after(10):
        while len(received) < count:
            message, _ = await channel.receive()
            assert message["op"] == "probes"
            received.extend(decode_outcomes(message))
    return received


# ProbeFeed.


async def test_feed_sends_outcomes_in_order(pair: tuple[Channel, Channel]) -> None:
    supervisor_end, worker_end = pair
    feed = ProbeFeed(lambda: STATE)
    sent = [outcome(index) for index in range(1, 6)]

    rows = feed.open()
    async with anyio.create_task_group() as group:
        group.start_soon(feed.run, supervisor_end)
        for item in sent[:2]:
            feed.push(item)
        received = await receive_outcomes(worker_end, 2)
        for item in sent[2:]:
            feed.push(item)
        received += await receive_outcomes(worker_end, 3)
        group.cancel_scope.cancel()

    assert decode_probe_state(rows) == STATE
    assert received == sent


def test_feed_drops_outcomes_without_process() -> None:
    feed = ProbeFeed(lambda: STATE)

    feed.push(outcome(1))
    feed.open()
    feed.push(outcome(2))
    feed.close()
    feed.push(outcome(3))

    assert feed.next_message() is None


def test_feed_open_forgets_earlier_outcomes() -> None:
    feed = ProbeFeed(lambda: STATE)
    feed.open()
    feed.push(outcome(1))

    feed.open()  # a new process starts from the state, which includes it
    feed.push(outcome(2))

    message = feed.next_message()
    assert message is not None
    assert decode_outcomes(message) == [outcome(2)]


def test_feed_overflow_sends_whole_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_probes, "MAX_QUEUED_OUTCOMES", 3)
    feed = ProbeFeed(lambda: STATE)
    feed.open()

    for index in range(1, 6):
        feed.push(outcome(index))
    message = feed.next_message()
    feed.push(outcome(6))
    after: Message | None = feed.next_message()

    assert message is not None
    assert message["op"] == "probe_state"
    assert decode_probe_state(message["state"]) == STATE
    assert feed.resyncs == 1
    assert after is not None
    assert decode_outcomes(after) == [outcome(6)]
    assert feed.next_message() is None


# SharedProbes against real upstreams.


async def test_probes_recorded_and_forwarded(
    farm: ServerFarm, pair: tuple[Channel, Channel]
) -> None:
    supervisor_end, worker_end = pair
    good, bad = farm.add("ok"), farm.add("status:500")
    graph = make_graph([good.address, bad.address])
    probes = SharedProbes(graph)
    feed = probes.feed()
    feed.open()

    async with anyio.create_task_group() as group:
        group.start_soon(feed.run, supervisor_end)
        probes.start(group)
        received = await receive_outcomes(worker_end, 2)
        probes.stop()
        group.cancel_scope.cancel()

    verdicts = {item.address: item.ok for item in received}
    assert verdicts == {good.address: True, bad.address: False}
    bad_endpoint = graph.clusters["api"].endpoints[1]
    assert not probes.table.is_available(bad_endpoint)
    assert bad.requests["/healthz"] == 1
    states = {item.address: item.healthy for item in probes.state()}
    assert states == {good.address: True, bad.address: False}


async def test_install_carries_state_and_probes_new_graph(
    farm: ServerFarm, pair: tuple[Channel, Channel]
) -> None:
    supervisor_end, worker_end = pair
    bad, added = farm.add("status:500"), farm.add("ok")
    probes = SharedProbes(make_graph([bad.address]))
    feed = probes.feed()
    feed.open()

    async with anyio.create_task_group() as group:
        group.start_soon(feed.run, supervisor_end)
        probes.start(group)
        first = await receive_outcomes(worker_end, 1)
        new_graph = make_graph([bad.address, added.address])
        probes.install(new_graph)
        kept_down = not probes.table.is_available(
            new_graph.clusters["api"].endpoints[0]
        )
        second = await receive_outcomes(worker_end, 2)
        probes.stop()
        group.cancel_scope.cancel()

    assert [item.ok for item in first] == [False]
    assert kept_down
    assert probes.graph is new_graph
    assert {item.address for item in second} == {bad.address, added.address}
    assert bad.requests["/healthz"] == 2  # once per graph
