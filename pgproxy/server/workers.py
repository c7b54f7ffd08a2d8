"""The supervisor of `[server] workers = N`: start, watch, reload, drain.

Invariants:
- Listening sockets are bound here, before any worker starts (see
  `pgproxy.server.sockets`), and each worker inherits its own set. A bind
  failure stops start-up with one error line and exit code 1.
- A worker that exits while the supervisor is not stopping is restarted in
  the same slot, on the same sockets, after a backoff. The backoff doubles
  for each quick crash (`RESTART_BACKOFF_MIN` to `RESTART_BACKOFF_MAX`
  seconds) and resets once a worker has run for `STABLE_AFTER` seconds. A
  worker that exits before it was ever ready stops start-up.
- A reload is validated here, then installed in every worker or in none
  (see `pgproxy.server.supervisor_reload`). SIGHUPs received before every
  worker is ready, and one held since start-up, cause one reload then.
- Health is decided here, once for all workers (see
  `pgproxy.server.supervisor_health`): active probes run here and every
  outcome goes to every worker; workers report the outcomes of their
  traffic, and every ejection and its end go to every worker.
- SIGTERM or SIGINT: /healthz turns 503, the supervisor closes its copies of
  the listening sockets, forwards SIGTERM to every worker, waits for them
  (each serves for `shutdown_delay`, then drains within `drain_timeout`),
  and exits 0. A second SIGTERM or
  SIGINT cuts the drain short, because every worker then gets SIGINT as its
  second shutdown signal. It is SIGINT and not another SIGTERM because a
  standard signal does not queue, so two SIGTERMs sent close together can
  reach a worker as one.
- /metrics and /status merge every worker's snapshot (see
  `pgproxy.server.supervisor_metrics`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence

import anyio
import anyio.abc

from pgproxy.graph.types import LoadedGraph
from pgproxy.observability.metrics import Snapshot, merge_snapshots
from pgproxy.observability.scrape import ThreadedRenderer
from pgproxy.server.admin import AdminServer, AdminSources
from pgproxy.server.listeners import BindError, check_ca_files
from pgproxy.server.reload import ReloadHistory
from pgproxy.server.signals import CoalescedTrigger, open_reload_receiver
from pgproxy.server.slots import (
    WorkerSlot,
    bind_slots,
    close_slot_sockets,
    describe_exit,
    send_signal,
)
from pgproxy.server.sockets import check_tls
from pgproxy.server.supervisor_health import SharedHealth
from pgproxy.server.supervisor_metrics import SupervisorMetrics
from pgproxy.server.supervisor_reload import SupervisorReload
from pgproxy.server.watch import watch_config

logger = logging.getLogger(__name__)

RESTART_BACKOFF_MIN = 0.1  # seconds
RESTART_BACKOFF_MAX = 5.0
STABLE_AFTER = 30.0  # seconds of uptime that reset the backoff
READY_TIMEOUT = 60.0  # seconds a starting worker has to report ready
KILL_GRACE = 5.0  # seconds past drain_timeout before a worker is killed


def worker_count(setting: int | str) -> int:
    """Return the number of workers for `[server] workers` ("auto": usable CPUs)."""
    if setting != "auto":
        return int(setting)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class Supervisor(SupervisorReload, SupervisorMetrics):
    """Runs N worker processes on shared listening sockets."""

    def __init__(
        self,
        config_path: str,
        loaded: LoadedGraph,
        payload: bytes,
        count: int,
        *,
        log_level: str = "INFO",
        worker_command: Sequence[str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.loaded = loaded
        self.started = loaded.graph.server
        self.payload = payload  # the config loader's output for the graph in force
        self.count = count
        self.log_level = log_level
        self.worker_command = list(
            worker_command or [sys.executable, "-m", "pgproxy.server.worker_main"]
        )
        self.history = ReloadHistory(config_path, loaded.config_hash)
        self.health = SharedHealth(loaded.graph)
        self.slots = [WorkerSlot(index, self.health.feed()) for index in range(count)]
        self.draining = False
        self.stopping = False
        self.drain_cut_short = False
        self.retired = Snapshot(processes=0)
        self._renderer = ThreadedRenderer()
        self._reload_lock = anyio.Lock()
        self._all_ready = anyio.Event()
        self._startup_failed = anyio.Event()
        self._startup_settled = anyio.Event()  # all ready, or one failed

    def __repr__(self) -> str:
        ready = sum(slot.ready for slot in self.slots)
        return (
            f"<Supervisor workers={self.count} ready={ready} draining={self.draining}>"
        )

    # -- sockets --------------------------------------------------------------

    def bind_all(self) -> list[str]:
        """Bind every listener's sockets; return one log line per listener.

        Raises OSError (sockets bound so far are closed) when a bind fails.
        """
        return bind_slots(self.loaded.graph.listeners.values(), self.slots)

    def close_sockets(self, names: Sequence[str] | None = None) -> None:
        """Close the supervisor's copies of listening sockets (all by default)."""
        close_slot_sockets(self.slots, names)

    # -- worker processes -----------------------------------------------------

    async def keep_running(self, slot: WorkerSlot) -> None:
        """Run the slot's worker and restart it with backoff until stopping."""
        backoff = RESTART_BACKOFF_MIN
        while not self.stopping:
            code = await slot.run_process(
                self.worker_command,
                self.config_path,
                lambda: (self.loaded.config_hash, self.payload),
                self.log_level,
                self._on_ready,
            )
            counters = slot.take_counters()
            if counters is not None:
                self.retired = merge_snapshots([self.retired, counters])
            if self.stopping:
                return
            if not slot.ready and not self._all_ready.is_set():
                logger.error(
                    "worker %d exited with %s before it was ready",
                    slot.index,
                    describe_exit(code),
                )
                self._startup_failed.set()
                self._startup_settled.set()
                return
            uptime = time.monotonic() - slot.started_at
            backoff = RESTART_BACKOFF_MIN if uptime >= STABLE_AFTER else backoff
            logger.warning(
                "worker %d (pid %s) exited with %s after %.1fs; restarting in %.1fs",
                slot.index,
                slot.pid,
                describe_exit(code),
                uptime,
                backoff,
            )
            slot.ready = False
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
            slot.restarts += 1

    def _on_ready(self, slot: WorkerSlot) -> None:
        if slot.config_hash != self.loaded.config_hash and slot.process is not None:
            # A reload ran while this worker was starting, so it missed it.
            logger.info(
                "worker %d started with an older config; restarting it", slot.index
            )
            send_signal(slot.process, signal.SIGTERM)
            return
        if all(item.ready for item in self.slots):
            self._all_ready.set()
            self._startup_settled.set()

    # -- lifecycle ------------------------------------------------------------

    async def run(self, watch: bool = False) -> int:
        """Serve until SIGTERM or SIGINT; return the process exit code.

        SIGHUPs received before every worker is ready, and one held since
        start-up, cause one reload once they are.
        """
        graph = self.loaded.graph
        try:
            # The workers load these files too; checked here, a broken one
            # stops start-up with one line instead of failing every worker.
            check_tls(list(graph.listeners.values()))
            check_ca_files(graph.clusters.values())
        except BindError as error:
            logger.error("%s", error)
            return 1
        try:
            lines = self.bind_all()
        except OSError as error:
            # strerror contains the whole message, without str()'s "[Errno N]".
            logger.error("%s", error.strerror or error)
            return 1
        admin = self._bind_admin()
        if admin is False:
            self.close_sockets()
            return 1
        for line in lines:
            logger.info("%s", line)
        reloads = CoalescedTrigger(lambda: self.reload("SIGHUP"))
        stop = anyio.Event()
        with open_reload_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP
        ) as signals:
            async with anyio.create_task_group() as group:
                group.start_soon(
                    _receive_signals, signals, reloads, stop, self.cut_drain_short
                )
                self.health.start(group)
                if isinstance(admin, AdminServer):
                    group.start_soon(admin.serve)
                for slot in self.slots:
                    group.start_soon(self.keep_running, slot)
                if not await self._wait_ready():
                    await self.drain()
                    group.cancel_scope.cancel()
                    return 1
                logger.info("pgproxy ready: %d workers", self.count)
                if watch:
                    group.start_soon(self._watch)
                # Reloads run from now on, so the SIGHUPs received while the
                # workers started were coalesced into one request.
                group.start_soon(reloads.run)
                await stop.wait()
                await self.drain()
                group.cancel_scope.cancel()
        logger.info("pgproxy stopped")
        return 0

    def _bind_admin(self) -> AdminServer | bool:
        address = self.loaded.graph.server.admin
        if address is None:
            return True
        sources = AdminSources(self.metrics, self.status, lambda: self.draining)
        admin = AdminServer(address, sources)
        try:
            bound = admin.bind()
        except OSError as error:
            logger.error("could not bind the admin listener on %s: %s", address, error)
            return False
        logger.info("admin listener listening on %s", bound)
        return admin

    async def _wait_ready(self) -> bool:
        with anyio.move_on_after(READY_TIMEOUT):
            await self._startup_settled.wait()
        if self._all_ready.is_set() and not self._startup_failed.is_set():
            return True
        if not self._startup_failed.is_set():
            logger.error("workers were not ready within %.0fs", READY_TIMEOUT)
        return False

    async def _watch(self) -> None:
        await watch_config(self.config_path, lambda: self.reload("file changed"))

    async def drain(self) -> None:
        """Stop every worker gracefully, then kill what is left."""
        self.draining = True
        self.stopping = True
        server = self.loaded.graph.server
        timeout = server.shutdown_delay + server.drain_timeout
        logger.info("draining: admin /healthz returns 503 from now on")
        logger.info("draining %d workers (up to %gs)", self.count, timeout)
        self.close_sockets()
        processes = self._processes()
        for process in processes:
            send_signal(process, signal.SIGTERM)
        if self.drain_cut_short:
            # The second signal came before the drain began.
            for process in processes:
                send_signal(process, signal.SIGINT)
        with anyio.move_on_after(timeout + KILL_GRACE):
            for process in processes:
                await process.wait()
        for process in processes:
            if process.returncode is None:
                logger.warning(
                    "worker pid %d did not stop in time; killing it", process.pid
                )
                send_signal(process, signal.SIGKILL)
                await process.wait()

    def cut_drain_short(self) -> None:
        """Make every worker cancel its drain, now or as soon as it begins."""
        self.drain_cut_short = True
        if not self.stopping:
            return  # `drain` sends the signals after its SIGTERMs
        for process in self._processes():
            send_signal(process, signal.SIGINT)

    def _processes(self) -> list[anyio.abc.Process]:
        return [slot.process for slot in self.slots if slot.process is not None]


async def _receive_signals(
    signals: AsyncIterator[signal.Signals],
    reloads: CoalescedTrigger,
    stop: anyio.Event,
    cut_drain_short: Callable[[], None],
) -> None:
    """Request a reload for each SIGHUP, and set `stop` at the first SIGTERM or SIGINT.

    Each later SIGTERM or SIGINT calls `cut_drain_short`.
    """
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            reloads.request()
        elif not stop.is_set():
            logger.info("received %s", name)
            stop.set()
        else:
            logger.info(
                "received %s during the shutdown, so the drain is cancelled", name
            )
            cut_drain_short()
