"""Reload requests are coalesced, and a SIGHUP held since start-up is delivered.

A burst of requests during a run queues one more run. The reload receiver
delivers the SIGHUPs held before it opened as one signal.
"""

from __future__ import annotations

import subprocess
import sys

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


# Holds SIGHUP and sends three, as an operator may during start-up, then opens
# the reload receiver. SIGUSR1, sent once the receiver is open, marks the end
# of what the held SIGHUPs delivered. After the receiver closes, one more
# SIGHUP must find it ignored again.
RECEIVER_SCRIPT = """
import os, signal, anyio
from pgproxy.server.sighup import hold_sighup, sighup_held
from pgproxy.server.signals import open_reload_receiver

hold_sighup()
for _ in range(3):
    os.kill(os.getpid(), signal.SIGHUP)

async def main():
    received = 0
    with open_reload_receiver(signal.SIGHUP, signal.SIGUSR1) as signals:
        print(sighup_held())
        os.kill(os.getpid(), signal.SIGUSR1)
        with anyio.fail_after(10):
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    break
                received += 1
    print(received)

anyio.run(main, backend="asyncio")
print(sighup_held())
print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)
os.kill(os.getpid(), signal.SIGHUP)
print("alive")
"""


def test_reload_receiver_delivers_held_sighup_once() -> None:
    done = subprocess.run(
        [sys.executable, "-c", RECEIVER_SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    held_inside, received, held_after, ignored_after, alive = done.stdout.split()
    assert held_inside == "False"
    assert received == "1"
    assert held_after == "True"
    assert ignored_after == "True"
    assert alive == "alive"
