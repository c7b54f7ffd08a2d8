"""Tests of the supervisor's shared health: probes, ejections, worker feeds."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

import pgproxy.server.supervisor_health as supervisor_health
from pgproxy.config.models import (
    ClusterConfig,
    Config,
    HealthCheckConfig,
    OutlierDetectionConfig,
    split_endpoint_address,
)
from pgproxy.graph.settings import ClusterSettings, ServerSettings, settings_from_config
from pgproxy.graph.types import Cluster, Endpoint, Graph
from pgproxy.health.reports import EndpointOutcomes, encode_report
from pgproxy.health.shared import (
    Ejection,
    ProbeOutcome,
    decode_ejections,
    decode_outcomes,
    decode_probe_state,
)
from pgproxy.server.control import Channel, Message
from pgproxy.server.supervisor_health import SharedHealth
from tests.health.servers import ServerFarm, server_farm

pytestmark = pytest.mark.anyio

ADDRESSES = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]


class FakeClock:
    """A clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def make_graph(
    addresses: list[str], base_ejection_time: str = "10s", probes: bool = True
) -> Graph:
    # One probe at start: later rounds are an hour away.
    check = HealthCheckConfig(
        path="/healthz",
        interval="1h",
        timeout="2s",
        unhealthy_threshold=1,
        healthy_threshold=1,
    )
    config = ClusterConfig(
        endpoints=addresses,
        health_check=check if probes else None,
        outlier_detection=OutlierDetectionConfig(
            consecutive_failures=3,
            base_ejection_time=base_ejection_time,
            max_ejection_percent=50,
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


def make_shared(clock: FakeClock | None = None) -> SharedHealth:
    """Return a SharedHealth whose first endpoint failed its probe."""
    shared = SharedHealth(make_graph(ADDRESSES), clock or FakeClock())
    endpoint = shared.graph.clusters["api"].endpoints[0]
    shared.table.record_probe(endpoint, False, "refused")
    return shared


def failures(address: str, count: int) -> EndpointOutcomes:
    return EndpointOutcomes("api", address, ((count, "http_503"),))


async def receive_outcomes(channel: Channel, count: int) -> list[ProbeOutcome]:
    """Receive `probes` messages until `count` outcomes have arrived."""
    received: list[ProbeOutcome] = []
    with anyio.fail_after(10):
        while len(received) < count:
            message, _ = await channel.receive()
            assert message["op"] == "probes"
            received.extend(decode_outcomes(message))
    return received


async def receive_ejections(channel: Channel) -> list[Ejection]:
    """Receive the next `ejections` message, skipping probe outcomes."""
    with anyio.fail_after(10):
        while True:
            message, _ = await channel.receive()
            if message["op"] == "ejections":
                return decode_ejections(message["ejections"])


# HealthFeed.


async def test_feed_sends_outcomes_in_order(pair: tuple[Channel, Channel]) -> None:
    supervisor_end, worker_end = pair
    shared = make_shared()
    feed = shared.feed()
    sent = [outcome(index) for index in range(1, 6)]

    start = feed.open()
    async with anyio.create_task_group() as group:
        group.start_soon(feed.run, supervisor_end)
        for item in sent[:2]:
            feed.push_outcome(item)
        received = await receive_outcomes(worker_end, 2)
        for item in sent[2:]:
            feed.push_outcome(item)
        received += await receive_outcomes(worker_end, 3)
        group.cancel_scope.cancel()

    assert decode_probe_state(start["probe_state"]) == shared.state()
    assert decode_ejections(start["ejections"]) == []
    assert received == sent


async def test_feed_drops_outcomes_without_process() -> None:
    feed = make_shared().feed()

    feed.push_outcome(outcome(1))
    feed.push_ejection(("api", ADDRESSES[1]), 1010.0, "ejected")
    feed.open()
    feed.push_outcome(outcome(2))
    feed.push_ejection(("api", ADDRESSES[1]), 1010.0, "ejected")
    feed.close()
    feed.push_outcome(outcome(3))
    feed.push_ejection(("api", ADDRESSES[1]), 0.0, "over")

    assert feed.next_message() is None


async def test_feed_open_forgets_earlier_outcomes() -> None:
    feed = make_shared().feed()
    feed.open()
    feed.push_outcome(outcome(1))
    feed.push_ejection(("api", ADDRESSES[1]), 1010.0, "ejected")

    feed.open()  # a new process starts from the state, which includes them
    feed.push_outcome(outcome(2))

    message = feed.next_message()
    assert message is not None
    assert decode_outcomes(message) == [outcome(2)]
    assert feed.next_message() is None


async def test_feed_overflow_sends_whole_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor_health, "MAX_QUEUED_OUTCOMES", 3)
    shared = make_shared()
    feed = shared.feed()
    feed.open()

    for index in range(1, 6):
        feed.push_outcome(outcome(index))
    message = feed.next_message()
    feed.push_outcome(outcome(6))
    after: Message | None = feed.next_message()

    assert message is not None
    assert message["op"] == "probe_state"
    assert decode_probe_state(message["state"]) == shared.state()
    assert not shared.state()[0].healthy
    assert feed.resyncs == 1
    assert after is not None
    assert decode_outcomes(after) == [outcome(6)]
    assert feed.next_message() is None


async def test_feed_sends_latest_ejection_per_endpoint() -> None:
    clock = FakeClock()
    feed = make_shared(clock).feed()
    feed.open()

    feed.push_ejection(("api", ADDRESSES[1]), 1010.0, "first")
    feed.push_ejection(("api", ADDRESSES[2]), 1005.0, "other")
    feed.push_ejection(("api", ADDRESSES[1]), 0.0, "ejection time is over")
    feed.push_ejection(("api", ADDRESSES[1]), 1030.0, "second")
    clock.now += 4.0  # the worker reads late: the time left shrinks
    message = feed.next_message()

    assert message is not None
    assert message["op"] == "ejections"
    assert decode_ejections(message["ejections"]) == [
        Ejection("api", ADDRESSES[1], 26.0, "second"),
        Ejection("api", ADDRESSES[2], 1.0, "other"),
    ]
    assert feed.next_message() is None


async def test_feed_sends_end_of_late_ejection() -> None:
    clock = FakeClock()
    feed = make_shared(clock).feed()
    feed.open()

    feed.push_ejection(("api", ADDRESSES[1]), 1002.0, "ejected")
    clock.now += 5.0
    message = feed.next_message()

    assert message is not None
    assert decode_ejections(message["ejections"]) == [
        Ejection("api", ADDRESSES[1], 0.0, "ejection time is over")
    ]


async def test_feed_start_carries_ejections() -> None:
    clock = FakeClock()
    shared = make_shared(clock)
    shared.record_report([failures(ADDRESSES[1], 3)])
    clock.now += 4.0

    start = shared.feed().open()

    [ejection] = decode_ejections(start["ejections"])
    assert ejection.address == ADDRESSES[1]
    assert ejection.remaining == pytest.approx(6.0)
    assert "3 failures in a row" in ejection.reason


async def test_feed_rejects_invalid_report(caplog: pytest.LogCaptureFixture) -> None:
    shared = make_shared()
    feed = shared.feed()

    invalid = {"op": "outcomes", "endpoints": [["api", ADDRESSES[1]]]}
    feed.receive_report(invalid, "worker 3")

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "invalid traffic report from worker 3" in errors[0].getMessage()


# SharedHealth ejections.


async def test_reports_of_two_workers_eject_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    shared = make_shared()
    feeds = [shared.feed(), shared.feed()]
    for feed in feeds:
        feed.open()

    # Two failures from one worker, one from the other: three in a row.
    feeds[0].receive_report(encode_report([failures(ADDRESSES[1], 2)]), "worker 0")
    not_yet = [feed.next_message() for feed in feeds]
    feeds[1].receive_report(encode_report([failures(ADDRESSES[1], 1)]), "worker 1")
    messages = [feed.next_message() for feed in feeds]

    assert not_yet == [None, None]
    endpoint = shared.graph.clusters["api"].endpoints[1]
    assert shared.table.ejection_deadline(endpoint) == 1010.0
    for message in messages:
        assert message is not None
        [ejection] = decode_ejections(message["ejections"])
        assert (ejection.address, ejection.remaining) == (ADDRESSES[1], 10.0)
    lines = [r for r in caplog.records if "is ejected" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].levelno == logging.WARNING
    assert "3 failures in a row, last: http_503" in lines[0].getMessage()
    assert shared.ejection_counts == {("api", ADDRESSES[1]): 1}


async def test_success_between_reports_resets_count() -> None:
    shared = make_shared()
    feed = shared.feed()
    feed.open()

    feed.receive_report(encode_report([failures(ADDRESSES[1], 2)]), "worker 0")
    success = EndpointOutcomes("api", ADDRESSES[1], ((0, ""),))
    feed.receive_report(encode_report([success]), "worker 0")
    feed.receive_report(encode_report([failures(ADDRESSES[1], 2)]), "worker 0")

    endpoint = shared.graph.clusters["api"].endpoints[1]
    assert shared.table.ejection_deadline(endpoint) == 0.0
    assert feed.next_message() is None


async def test_ejection_end_sent_at_deadline(
    pair: tuple[Channel, Channel], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    supervisor_end, worker_end = pair
    # No probes: the endpoints are not listening, and only time ends this.
    graph = make_graph(ADDRESSES, base_ejection_time="300ms", probes=False)
    shared = SharedHealth(graph)
    feed = shared.feed()
    feed.open()

    async with anyio.create_task_group() as group:
        group.start_soon(feed.run, supervisor_end)
        shared.start(group)
        shared.record_report([failures(ADDRESSES[1], 3)])
        endpoint = shared.graph.clusters["api"].endpoints[1]
        deadline = shared.table.ejection_deadline(endpoint)
        [ejected] = await receive_ejections(worker_end)
        [ended] = await receive_ejections(worker_end)
        ended_at = time.monotonic()
        shared.stop()
        group.cancel_scope.cancel()

    assert ejected.remaining > 0
    assert ended == Ejection("api", ADDRESSES[1], 0.0, "ejection time is over")
    # The supervisor ends an ejection no earlier than its deadline.
    assert ended_at >= deadline
    assert shared.table.ejection_deadline(endpoint) == 0.0
    returns = [r for r in caplog.records if "healthy again" in r.getMessage()]
    assert len(returns) == 1
    assert returns[0].levelno == logging.INFO
    assert "ejection time is over" in returns[0].getMessage()


async def test_install_keeps_ejection() -> None:
    shared = make_shared()
    feed = shared.feed()
    feed.open()
    shared.record_report([failures(ADDRESSES[1], 3)])
    feed.next_message()

    shared.install(make_graph([ADDRESSES[1], ADDRESSES[2]]))
    shared.record_report([failures(ADDRESSES[2], 1)])

    endpoint = shared.graph.clusters["api"].endpoints[0]
    assert endpoint.address == ADDRESSES[1]
    assert shared.table.ejection_deadline(endpoint) == 1010.0
    assert feed.next_message() is None  # nothing changed for the workers


# SharedHealth probes against real upstreams.


async def test_probes_recorded_and_forwarded(
    farm: ServerFarm, pair: tuple[Channel, Channel]
) -> None:
    supervisor_end, worker_end = pair
    good, bad = farm.add("ok"), farm.add("status:500")
    graph = make_graph([good.address, bad.address])
    probes = SharedHealth(graph)
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
    probes = SharedHealth(make_graph([bad.address]))
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
