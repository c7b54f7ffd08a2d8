"""Two-phase reload across the supervisor's workers: validate, send, commit.

Invariants:
- A reload is validated here first: the graph, the TLS files of every TLS
  listener, and the binds of new listeners. Only then is it
  sent to the workers, as the exact bytes validated, so every worker builds
  the same graph.
- It becomes the supervisor's config (the one /status reports and a
  restarted worker gets) only when every ready worker installed it. If one
  rejects it, the others get the old config back and the new sockets are
  closed. The outcome is logged once, here. The supervisor's health table
  and probes switch to the new graph in the same step.
- One reload runs at a time (`_reload_lock`).
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from pgproxy.errors import ConfigError
from pgproxy.graph.settings import ServerSettings
from pgproxy.graph.types import LoadedGraph
from pgproxy.server.listeners import BindError, check_ca_files
from pgproxy.server.loading import load_config_async
from pgproxy.server.reload import (
    ReloadHistory,
    ReloadPlan,
    describe_config_error,
    kept_tls_listeners,
    plan_reload,
)
from pgproxy.server.slots import WorkerSlot, send_signal
from pgproxy.server.sockets import (
    bind_added,
    bound_address,
    check_tls,
    close_sockets,
)
from pgproxy.server.supervisor_health import SharedHealth
from pgproxy.server.worker import encode_config, oversized_message, payload_fits

logger = logging.getLogger(__name__)

RELOAD_TIMEOUT = 60.0  # seconds a worker has to reply to a reload


class SupervisorReload:
    """The reload of `Supervisor`: prepare, send, then commit or roll back."""

    # Set by `Supervisor.__init__`.
    config_path: str
    loaded: LoadedGraph
    # The [server] settings the supervisor started with: reloads keep them.
    started: ServerSettings
    payload: bytes
    count: int
    slots: list[WorkerSlot]
    history: ReloadHistory
    health: SharedHealth
    stopping: bool
    _reload_lock: anyio.Lock

    if TYPE_CHECKING:
        # Defined by `Supervisor`, next to the socket binding.
        def close_sockets(self, names: Sequence[str] | None = None) -> None: ...

    async def reload(self, trigger: str = "SIGHUP") -> bool:
        """Validate the config, then reload every worker; log the outcome once."""
        async with self._reload_lock:
            if self.stopping:
                # From the first signal on, shutdown_delay included: added
                # listeners would open in workers about to close theirs.
                logger.info("%s ignored: pgproxy is draining", trigger)
                return False
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
            loaded, payload = await load_config_async(self.config_path)
        except ConfigError as error:
            return self._reload_failed(describe_config_error(self.config_path, error))
        if not payload_fits(payload):
            return self._reload_failed(oversized_message(self.config_path, payload))
        plan = plan_reload(self.loaded.graph, loaded.graph, self.started)
        reused = self._reused_sockets(plan)
        # Kept TLS listeners load their files again in the workers, so files
        # renewed in place are checked here too.
        tls = [*plan.added_listeners, *kept_tls_listeners(loaded.graph, plan)]
        try:
            await anyio.to_thread.run_sync(check_tls, tls)
            check_ca_files(loaded.graph.clusters.values())
            bound = bind_added(
                [item for item in plan.added_listeners if item.name not in reused],
                self.count,
            )
        except (OSError, BindError) as error:
            return self._reload_failed(str(error))

        accepted, failures = await self._send_reload(payload, {**reused, **bound})
        if failures:
            await self._roll_back(loaded, accepted)
            close_sockets(bound)
            return self._reload_failed("; ".join(failures))

        self._commit(loaded, payload, plan, bound)
        return True, loaded.config_hash, None

    def _reused_sockets(self, plan: ReloadPlan) -> dict[str, list[socket.socket]]:
        """Return the sockets of listeners that keep their address but change TLS.

        Binding their address again would fail, because it is in use here.
        """
        reused: dict[str, list[socket.socket]] = {}
        for listener in plan.added_listeners:
            old = self.loaded.graph.listeners.get(listener.name)
            if old is not None and old.settings.address == listener.settings.address:
                reused[listener.name] = [slot.sockets[old.name] for slot in self.slots]
        return reused

    async def _send_reload(
        self, payload: bytes, added: dict[str, list[socket.socket]]
    ) -> tuple[list[WorkerSlot], list[str]]:
        """Send a config to every worker; return those that installed it, and errors."""
        accepted: list[WorkerSlot] = []
        failures: list[str] = []

        async def send(slot: WorkerSlot) -> None:
            sockets = {name: items[slot.index] for name, items in added.items()}
            error = await self._reload_worker(slot, payload, sockets)
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
            error = await self._reload_worker(slot, self.payload, sockets)
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
        payload: bytes,
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
            and self.loaded.graph.listeners[name].settings.address
            == loaded.graph.listeners[name].settings.address
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
        # From here on a worker that starts gets the new config, and the
        # health state of the new graph with it.
        self.loaded, self.payload = loaded, payload
        self.health.install(loaded.graph)
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
        self, slot: WorkerSlot, payload: bytes, sockets: dict[str, socket.socket]
    ) -> str | None:
        """Send one worker a config; return its error, or None.

        A worker that is not ready, or does not reply, returns None: a worker
        that starts later gets the config in force, and `_commit` restarts one
        that runs another config. A worker that installed it has its slot's
        `config_hash` updated, so `_commit` keeps it running.
        """
        message = {
            "op": "reload",
            "config": encode_config(payload),
            "listeners": list(sockets),
        }
        fds = [sock.fileno() for sock in sockets.values()]
        reply = await slot.request(message, RELOAD_TIMEOUT, fds)
        if reply is None:
            return None
        if reply.get("ok"):
            slot.config_hash = str(reply.get("hash"))
            return None
        return str(reply.get("error"))

    def _reload_failed(self, message: str) -> tuple[bool, None, str]:
        logger.error(
            "reload failed, keeping the running config (hash %s) in every worker: %s",
            self.history.config_hash[:12],
            message,
        )
        return False, None, message
