"""Reload requests are coalesced: a burst during a run queues one more run."""

from __future__ import annotations

import anyio
import pytest

from pgproxy.server.signals import CoalescedTrigger

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_burst_during_a_run_queues_one_more_run() -> None:
    started = anyio.Event()
    release = anyio.Event()
    finished: list[int] = []

    async def action() -> None:
        started.set()
        await release.wait()
        finished.append(len(finished))

    trigger = CoalescedTrigger(action)
    async with anyio.create_task_group() as group:
        group.start_soon(trigger.run)
        trigger.request()
        await started.wait()
        for _ in range(50):
            trigger.request()
        release.set()
        with anyio.fail_after(5):
            while len(finished) < 2:  # noqa: ASYNC110 (polled on purpose)
                await anyio.sleep(0.01)
        await anyio.sleep(0.05)  # room for a wrong third run to start
        group.cancel_scope.cancel()
    assert trigger.runs == 2
    assert finished == [0, 1]


async def test_requests_before_run_are_kept() -> None:
    ran = anyio.Event()

    async def action() -> None:
        ran.set()

    trigger = CoalescedTrigger(action)
    trigger.request()
    trigger.request()
    async with anyio.create_task_group() as group:
        group.start_soon(trigger.run)
        with anyio.fail_after(5):
            await ran.wait()
        await anyio.sleep(0.05)
        group.cancel_scope.cancel()
    assert trigger.runs == 1
