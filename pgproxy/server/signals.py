"""Shutdown signals: SIGTERM and SIGINT start a drain, a second one cuts it short.

Reload signals go through `CoalescedTrigger`, so a burst of SIGHUPs costs
one reload after the running one instead of one reload each. The SIGHUP
receiver is opened with `open_reload_receiver`, which delivers a SIGHUP held
since start-up (see `pgproxy.server.sighup`) and never leaves SIGHUP with
its default action, which would end the process.

anyio's signal receiver only records the signal in the handler; the
shutdown itself runs in the main task.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio

from pgproxy.server.sighup import sighup_held

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
                    logger.info(
                        "received %s during the shutdown, so the drain is cancelled",
                        name,
                    )
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


@contextlib.contextmanager
def open_reload_receiver(
    *signums: signal.Signals,
) -> Iterator[AsyncIterator[signal.Signals]]:
    """Open anyio's receiver for `signums` (SIGHUP among them), then unblock SIGHUP.

    A SIGHUP held since start-up reaches the receiver here, once however
    many were sent. On exit SIGHUP gets back the action and mask it had on
    entry, because closing the receiver alone would restore the default
    action, which ends the process.
    """
    previous = signal.getsignal(signal.SIGHUP)
    try:
        with anyio.open_signal_receiver(*signums) as receiver:
            held = sighup_held()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
            try:
                yield receiver
            finally:
                if held:
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    finally:
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)
