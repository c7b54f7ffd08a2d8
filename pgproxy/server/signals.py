"""Shutdown signals: SIGTERM and SIGINT start a drain, a second one cuts it short.

anyio's signal receiver only records the signal in the handler; the
shutdown itself runs in the main task.
"""

from __future__ import annotations

import logging
import signal

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
