"""Shutdown signals: SIGTERM and SIGINT start a drain, a second one cuts it short.

Reload signals go through `CoalescedTrigger`, so a burst of SIGHUPs costs
one reload after the running one instead of one reload each.

anyio's signal receiver only records the signal in the handler; the
shutdown itself runs in the main task.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import anyio

logger = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class ShutdownSignals:
    """Events set by the first and the second shutdown signal."""

    def __init__(self) -> None:
        self.requested = anyio.Event()
        self.forced = anyio.Event()

    async def wait(self) -> None:
        """Wait for the first shutdown signal (a shutdown trigger for `serve`)."""
        await self.requested.wait()

    async def receive(self) -> None:
        """Receive signals until cancelled, setting `requested`, then `forced`."""
        with anyio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.requested.is_set():
                    logger.info("received %s, shutting down", name)
                    self.requested.set()
                else:
                    logger.info("received %s again, cancelling the drain", name)
                    self.forced.set()


class CoalescedTrigger:
    """Runs an action once per burst of requests.

    A request while the action runs queues one more run, however many
    requests arrive, so 50 SIGHUPs during a reload cause one more reload,
    not 50. Requests before `run` starts are kept.
    """

    def __init__(self, action: Callable[[], Awaitable[object]]) -> None:
        self._action = action
        self._requested = anyio.Event()
        self.runs = 0

    def request(self) -> None:
        """Ask for a run; a run already queued absorbs this request."""
        self._requested.set()

    async def run(self) -> None:
        """Run the action for each burst of requests until cancelled."""
        while True:
            await self._requested.wait()
            self._requested = anyio.Event()
            self.runs += 1
            await self._action()
