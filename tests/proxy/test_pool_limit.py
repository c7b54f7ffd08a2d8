"""The connection limit of an endpoint pool: waiting, order, timeouts.

No sockets: the tests move the pool's counters the way connections would
(`active` up for a connection in use, `forget_active` when it goes away)
and check which waiters get a slot, in which order, and when they give up.
"""

from __future__ import annotations

import asyncio

import pytest

from pgproxy.errors import EndpointBusyError
from pgproxy.graph.types import Endpoint
from pgproxy.proxy.pool import EndpointPool

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_pool(max_active: int, active: int) -> EndpointPool:
    endpoint = Endpoint("127.0.0.1:1", "127.0.0.1", 1, False, 1, "api")
    pool = EndpointPool(endpoint, 4.0, 8, lambda _: None)  # type: ignore[arg-type,return-value]
    pool.max_active = max_active
    pool.active = active
    return pool


async def take_slot(pool: EndpointPool, name: str, log: list[str]) -> None:
    """Wait like Exchange.connect_when_free, then hold the slot as in use."""
    await pool.wait_for_slot(5.0)
    pool.end_reservation()
    pool.active += 1
    log.append(name)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_no_limit_is_never_full() -> None:
    pool = make_pool(0, 1000)

    assert not pool.full()


async def test_full_at_the_limit() -> None:
    pool = make_pool(2, 1)
    assert not pool.full()

    pool.active = 2

    assert pool.full()


async def test_opening_connections_count() -> None:
    pool = make_pool(2, 1)

    pool.opening = 1

    assert pool.full()


async def test_waiters_get_freed_slots_in_order() -> None:
    pool = make_pool(1, 1)
    log: list[str] = []
    first = asyncio.create_task(take_slot(pool, "first", log))
    await settle()
    second = asyncio.create_task(take_slot(pool, "second", log))
    await settle()
    assert pool.waiting == 2

    pool.forget_active()
    await settle()
    assert log == ["first"]
    assert pool.waiting == 1

    pool.forget_active()
    await settle()
    assert log == ["first", "second"]
    assert pool.waiting == 0
    await asyncio.gather(first, second)


async def test_reserved_slot_keeps_newcomers_out() -> None:
    pool = make_pool(1, 1)
    log: list[str] = []
    waiter = asyncio.create_task(take_slot(pool, "waiter", log))
    await settle()

    # The slot is reserved for the waiter before its task runs, so a request
    # arriving in between must see the pool full.
    pool.forget_active()
    assert pool.waiting == 0
    assert pool.full()

    await waiter
    assert log == ["waiter"]
    assert pool.active == 1


async def test_new_request_queues_behind_a_waiter() -> None:
    pool = make_pool(2, 2)
    waiter = asyncio.create_task(pool.wait_for_slot(5.0))
    await settle()

    pool.active = 1  # room for one, but a waiter is first in line

    assert pool.full()
    waiter.cancel()


async def test_wait_times_out_with_overflow_error() -> None:
    pool = make_pool(1, 1)

    with pytest.raises(EndpointBusyError) as caught:
        await pool.wait_for_slot(0.01)

    assert caught.value.status == 503
    assert caught.value.flag == "upstream_overflow"
    assert caught.value.bytes_sent is False
    assert "max_connections = 1" in str(caught.value)
    assert pool.waiting == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    pool = make_pool(1, 1)
    log: list[str] = []
    cancelled = asyncio.create_task(take_slot(pool, "cancelled", log))
    await settle()
    stays = asyncio.create_task(take_slot(pool, "stays", log))
    await settle()

    cancelled.cancel()
    await settle()
    pool.forget_active()
    await stays

    assert log == ["stays"]
    assert cancelled.cancelled()


async def test_woken_then_cancelled_passes_the_slot_on() -> None:
    pool = make_pool(1, 1)
    log: list[str] = []
    woken = asyncio.create_task(take_slot(pool, "woken", log))
    await settle()
    next_in_line = asyncio.create_task(take_slot(pool, "next", log))
    await settle()

    # The first waiter is woken (its slot reserved) and cancelled before it
    # runs, as when its client goes away in the same loop iteration.
    pool.forget_active()
    woken.cancel()
    await next_in_line

    assert log == ["next"]
    assert pool.active == 1
    # No reservation leaked: once the slot is free again, it is free.
    pool.forget_active()
    assert not pool.full()


async def test_raised_limit_wakes_waiters() -> None:
    pool = make_pool(1, 1)
    log: list[str] = []
    tasks = [asyncio.create_task(take_slot(pool, str(i), log)) for i in range(3)]
    await settle()

    pool.max_active = 0
    pool.wake()
    await asyncio.gather(*tasks)

    assert log == ["0", "1", "2"]


async def test_begun_connect_counts_at_once() -> None:
    pool = make_pool(1, 0)

    pool.begin_connect()

    assert pool.full()


async def test_cancelled_connect_wakes_waiter() -> None:
    pool = make_pool(1, 0)
    log: list[str] = []
    pool.begin_connect()
    waiter = asyncio.create_task(take_slot(pool, "waiter", log))
    await settle()
    assert log == []

    # The exchange that counted the connection went away before its connect
    # task ran, so the connection is counted down without being opened.
    pool.cancel_connect()
    await waiter

    assert log == ["waiter"]
    assert pool.opening == 0
    assert pool.active == 1
