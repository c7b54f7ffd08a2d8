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
- A reload is validated here first: the graph, the TLS files of new or
  changed TLS listeners, and the binds of new listeners. Only then is it
  sent to the workers, as the exact bytes validated, so every worker builds
  the same graph. It becomes the supervisor's config (the one /status
  reports and a restarted worker gets) only when every ready worker
  installed it. If one rejects it, the others get the old config back and
  the new sockets are closed. The outcome is logged once, here.
- SIGTERM or SIGINT: /healthz turns 503, the supervisor closes its copies of
  the listening sockets, forwards SIGTERM to every worker, waits for them
  (each drains within `drain_timeout`), and exits 0.
- /metrics merges every worker's snapshot, plus the counters of workers
  that exited, so totals do not go back when a worker is replaced.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from pgproxy.errors import ConfigError
from pgproxy.graph.load import LoadedGraph
from pgproxy.observability.metrics import Snapshot, merge_snapshots
from pgproxy.server.admin import AdminServer, AdminSources
from pgproxy.server.control import Message
from pgproxy.server.listeners import BindError
from pgproxy.server.reload import (
    ReloadHistory,
    ReloadPlan,
    describe_config_error,
    plan_reload,
    read_config,
)
from pgproxy.server.slots import (
    WorkerSlot,
    bind_slots,
    close_slot_sockets,
    describe_exit,
    send_signal,
)
from pgproxy.server.sockets import (
    bind_added,
    bound_address,
    check_tls,
    close_sockets,
)
from pgproxy.server.status import merge_health, status_document
from pgproxy.server.watch import watch_config
from pgproxy.server.worker import encode_config

if TYPE_CHECKING:
    from pgproxy.observability.exposition import MetricsRenderer

logger = logging.getLogger(__name__)

RESTART_BACKOFF_MIN = 0.1  # seconds
RESTART_BACKOFF_MAX = 5.0
STABLE_AFTER = 30.0  # seconds of uptime that reset the backoff
READY_TIMEOUT = 60.0  # seconds a starting worker has to report ready
REQUEST_TIMEOUT = 5.0  # seconds a worker has to reply to a snapshot request
RELOAD_TIMEOUT = 60.0
KILL_GRACE = 5.0  # seconds past drain_timeout before a worker is killed


def worker_count(setting: int | str) -> int:
    """Return the number of workers for `[server] workers` ("auto": usable CPUs)."""
    if setting != "auto":
        return int(setting)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class Supervisor:
    """Runs N worker processes on shared listening sockets."""

    def __init__(
        self,
        config_path: str,
        loaded: LoadedGraph,
        source: bytes,
        count: int,
        *,
        log_level: str = "INFO",
        worker_command: Sequence[str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.loaded = loaded
        self.source = source  # bytes of the config in force
        self.count = count
        self.log_level = log_level
        self.worker_command = list(
            worker_command or [sys.executable, "-m", "pgproxy.server.worker_main"]
        )
        self.history = ReloadHistory(config_path, loaded.config_hash)
        self.slots = [WorkerSlot(index) for index in range(count)]
        self.draining = False
        self.stopping = False
        self.retired = Snapshot(processes=0)
        self._renderer: MetricsRenderer | None = None  # created on first scrape
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
                lambda: self.source,
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
        """Serve until SIGTERM or SIGINT; return the process exit code."""
        try:
            lines = self.bind_all()
        except OSError as error:
            logger.error("%s", error)
            return 1
        admin = self._bind_admin()
        if admin is False:
            self.close_sockets()
            return 1
        for line in lines:
            logger.info("%s", line)
        with anyio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP
        ) as signals:
            async with anyio.create_task_group() as group:
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
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        group.start_soon(self.reload, "SIGHUP")
                        continue
                    logger.info("received %s", signal.Signals(signum).name)
                    break
                await self.drain()
                group.cancel_scope.cancel()
        logger.info("pgproxy stopped")
        return 0

    def _bind_admin(self) -> AdminServer | bool:
        address = self.loaded.graph.config.server.admin
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
        timeout = self.loaded.graph.config.server.drain_timeout
        logger.info("draining: admin /healthz returns 503 from now on")
        logger.info("draining %d workers (up to %gs)", self.count, timeout)
        self.close_sockets()
        processes = [slot.process for slot in self.slots if slot.process is not None]
        for process in processes:
            send_signal(process, signal.SIGTERM)
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

    # -- admin ----------------------------------------------------------------

    async def _gather(self) -> dict[int, Message]:
        replies: dict[int, Message] = {}

        async def ask(slot: WorkerSlot) -> None:
            reply = await slot.request({"op": "snapshot"}, REQUEST_TIMEOUT)
            if reply is not None:
                replies[slot.index] = reply
                slot.last_snapshot = Snapshot.from_wire(reply["metrics"])

        async with anyio.create_task_group() as group:
            for slot in self.slots:
                group.start_soon(ask, slot)
        return replies

    async def metrics(self) -> bytes:
        """Return the Prometheus text of every worker, merged."""
        # Imported here, as in Operations, so `pgproxy run` without an admin
        # listener does not load prometheus-client.
        from pgproxy.observability.exposition import MetricsRenderer, ServerState

        if self._renderer is None:
            self._renderer = MetricsRenderer()
        await self._gather()
        live = [slot.last_snapshot for slot in self.slots if slot.last_snapshot]
        merged = merge_snapshots([self.retired, *live])
        server = ServerState(
            config_hash=self.history.config_hash,
            reloads=self.history.counts,
            last_reload_time=self.history.last_attempt_at,
            last_reload_ok=self.history.last_outcome != "failure",
            workers=self.count,
            worker_restarts=sum(slot.restarts for slot in self.slots),
            worker_pids={
                str(slot.index): slot.process.pid
                for slot in self.slots
                if slot.process is not None
            },
        )
        return self._renderer.render(merged, server)

    async def status(self) -> dict[str, Any]:
        """Return the /status document with every worker's endpoint health."""
        replies = await self._gather()
        health = {str(index): reply["health"] for index, reply in replies.items()}
        return status_document(
            self.history.as_dict(),
            merge_health(health),
            [slot.describe() for slot in self.slots],
            draining=self.draining,
        )

    # -- reload ---------------------------------------------------------------

    async def reload(self, trigger: str = "SIGHUP") -> bool:
        """Validate the config, then reload every worker; log the outcome once."""
        async with self._reload_lock:
            ok, config_hash, error = await self._reload(trigger)
        self.history.record("success" if ok else "failure", config_hash, error)
        return ok

    async def _reload(self, trigger: str) -> tuple[bool, str | None, str | None]:
        """Return (ok, hash of the config now in force, error message).

        Two phases: the new config is validated here (graph, TLS files, new
        sockets) and sent to every worker. Only when all of them installed
        it does it become the supervisor's config. Otherwise the workers that
        installed it get the old config back, so all of them keep one config.
        """
        logger.info("reloading %s (%s)", self.config_path, trigger)
        try:
            loaded, source = await anyio.to_thread.run_sync(
                read_config, self.config_path
            )
        except ConfigError as error:
            return self._reload_failed(describe_config_error(self.config_path, error))
        plan = plan_reload(self.loaded.graph, loaded.graph)
        reused = self._reused_sockets(plan)
        try:
            await anyio.to_thread.run_sync(check_tls, plan.added_listeners)
            bound = bind_added(
                [item for item in plan.added_listeners if item.name not in reused],
                self.count,
            )
        except (OSError, BindError) as error:
            return self._reload_failed(str(error))

        accepted, failures = await self._send_reload(source, {**reused, **bound})
        if failures:
            await self._roll_back(loaded, accepted)
            close_sockets(bound)
            return self._reload_failed("; ".join(failures))

        self._commit(loaded, source, plan, bound)
        return True, loaded.config_hash, None

    def _reused_sockets(self, plan: ReloadPlan) -> dict[str, list[socket.socket]]:
        """Return the sockets of listeners that keep their address but change TLS.

        Binding their address again would fail, because it is in use here.
        """
        reused: dict[str, list[socket.socket]] = {}
        for listener in plan.added_listeners:
            old = self.loaded.graph.listeners.get(listener.name)
            if old is not None and old.config.address == listener.config.address:
                reused[listener.name] = [slot.sockets[old.name] for slot in self.slots]
        return reused

    async def _send_reload(
        self, source: bytes, added: dict[str, list[socket.socket]]
    ) -> tuple[list[WorkerSlot], list[str]]:
        """Send a config to every worker; return those that installed it, and errors."""
        accepted: list[WorkerSlot] = []
        failures: list[str] = []

        async def send(slot: WorkerSlot) -> None:
            sockets = {name: items[slot.index] for name, items in added.items()}
            error = await self._reload_worker(slot, source, sockets)
            if error is None:
                accepted.append(slot)
            else:
                failures.append(f"worker {slot.index}: {error}")

        async with anyio.create_task_group() as group:
            for slot in self.slots:
                group.start_soon(send, slot)
        return accepted, failures

    async def _roll_back(
        self, rejected: LoadedGraph, accepted: Sequence[WorkerSlot]
    ) -> None:
        """Reinstall the config in force in workers that installed `rejected`."""
        back = plan_reload(rejected.graph, self.loaded.graph)
        names = [listener.name for listener in back.added_listeners]
        for slot in accepted:
            # The slots still hold the sockets of the config in force.
            sockets = {name: slot.sockets[name] for name in names}
            error = await self._reload_worker(slot, self.source, sockets)
            if error is not None and slot.process is not None:
                logger.error(
                    "worker %d could not return to the running config (%s); "
                    "restarting it",
                    slot.index,
                    error,
                )
                send_signal(slot.process, signal.SIGTERM)

    def _commit(
        self,
        loaded: LoadedGraph,
        source: bytes,
        plan: ReloadPlan,
        added: dict[str, list[socket.socket]],
    ) -> None:
        """Make a config every worker installed the supervisor's config.

        `added` contains the sockets bound for it. A listener that kept its
        address keeps the sockets of its slots.
        """
        if plan.restart_required:
            logger.warning(
                "%s changed: restart pgproxy for it to take effect",
                ", ".join(plan.restart_required),
            )
        # A listener whose TLS changed keeps its sockets (`_reused_sockets`).
        kept = [
            name
            for name in plan.removed_listeners
            if name in loaded.graph.listeners
            and self.loaded.graph.listeners[name].config.address
            == loaded.graph.listeners[name].config.address
        ]
        self.close_sockets(
            [name for name in plan.removed_listeners if name not in kept]
        )
        for name, sockets in added.items():
            for slot, sock in zip(self.slots, sockets, strict=True):
                slot.sockets[name] = sock
            logger.info(
                'listener "%s" listening on %s', name, bound_address(sockets[0])
            )
        # From here on a worker that starts gets the new config.
        self.loaded, self.source = loaded, source
        for slot in self.slots:
            if slot.process is not None and slot.config_hash != loaded.config_hash:
                # It was starting during the reload and got the old config.
                logger.info(
                    "worker %d started with an older config; restarting it",
                    slot.index,
                )
                send_signal(slot.process, signal.SIGTERM)
        logger.info(
            "reloaded %s (hash %s) in %d workers: %s",
            self.config_path,
            loaded.config_hash[:12],
            self.count,
            plan.summary(),
        )

    async def _reload_worker(
        self, slot: WorkerSlot, source: bytes, sockets: dict[str, socket.socket]
    ) -> str | None:
        """Send one worker a config; return its error, or None.

        A worker that is not ready, or does not reply, returns None: a worker
        that starts later gets the config in force (see `_commit`).
        """
        message = {
            "op": "reload",
            "config": encode_config(source),
            "listeners": list(sockets),
        }
        fds = [sock.fileno() for sock in sockets.values()]
        reply = await slot.request(message, RELOAD_TIMEOUT, fds)
        if reply is None or reply.get("ok"):
            return None
        return str(reply.get("error"))

    def _reload_failed(self, message: str) -> tuple[bool, None, str]:
        logger.error(
            "reload failed, keeping the running config (hash %s) in every worker: %s",
            self.history.config_hash[:12],
            message,
        )
        return False, None, message
