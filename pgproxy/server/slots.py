"""One worker position of the supervisor: its sockets, process and channel.

A slot outlives its processes: a replacement worker starts in the same slot,
on the same listening sockets, with the same index (the `worker` label of
the metrics). Requests to the worker carry an id; the slot's reader task
hands each reply to the caller waiting for that id. The slot's health feed,
when it has one, forwards the supervisor's probe outcomes and ejections to
the worker and takes the worker's traffic reports to the supervisor.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc

from pgproxy.graph.types import Listener
from pgproxy.health.reports import REPORT_OP
from pgproxy.observability.metrics import Snapshot
from pgproxy.server.control import Channel, ChannelClosedError, Message
from pgproxy.server.sockets import bind_listener, bound_address
from pgproxy.server.supervisor_health import HealthFeed
from pgproxy.server.worker import ENVIRONMENT_VARIABLE, WorkerSettings, encode_config

logger = logging.getLogger(__name__)


@dataclass
class WorkerSlot:
    """One worker position and the process currently running in it."""

    index: int
    feed: HealthFeed | None = None
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    process: anyio.abc.Process | None = None
    channel: Channel | None = None
    pid: int | None = None
    started_at: float = 0.0  # time.monotonic() at the last start
    ready: bool = False
    restarts: int = 0
    last_snapshot: Snapshot | None = None
    config_hash: str = ""  # of the config the current process started with
    _pending: dict[int, tuple[anyio.Event, list[Message]]] = field(default_factory=dict)
    _next_id: int = 0

    def describe(self) -> dict[str, Any]:
        """Return the slot's state for /status."""
        described: dict[str, Any] = {
            "id": self.index,
            "pid": self.pid if self.process is not None else None,
            "ready": self.ready,
            "restarts": self.restarts,
        }
        snapshot = self.last_snapshot
        if snapshot is not None:
            # Counts of the current process only, so an operator can see
            # how the kernel spreads connections over the workers.
            described["connections"] = sum(
                counts[0] for counts in snapshot.connections.values()
            )
            described["requests"] = sum(
                sum(stats.statuses.values()) for stats in snapshot.requests.values()
            )
        return described

    async def run_process(
        self,
        command: Sequence[str],
        config_path: str,
        config: Callable[[], tuple[str, bytes]],
        log_level: str,
        on_ready: Callable[[WorkerSlot], None],
    ) -> int:
        """Start a worker in this slot, wait for it to exit, return its status.

        `config` returns the hash of the config in force and its loader
        payload, sent to the worker as its first message with the health
        state from the feed; `config_hash` records the hash.
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        settings = WorkerSettings(
            config=config_path,
            index=self.index,
            control_fd=child.fileno(),
            listener_fds={name: sock.fileno() for name, sock in self.sockets.items()},
            log_level=log_level,
        )
        env = {**os.environ, ENVIRONMENT_VARIABLE: settings.to_environment()}
        try:
            # A session of its own keeps a terminal's Ctrl-C and hangup away
            # from the workers: the supervisor decides what they do.
            process = await anyio.open_process(
                list(command),
                stdin=None,
                stdout=None,
                stderr=None,
                env=env,
                pass_fds=[child.fileno(), *settings.listener_fds.values()],
                start_new_session=True,
            )
        finally:
            child.close()
        channel = await Channel.open(parent)
        # One step without an await: the config the worker starts with, the
        # health state it starts from, and the queueing of later changes.
        self.config_hash, payload = config()
        start: Message = {"op": "start", "config": encode_config(payload)}
        if self.feed is not None:
            start.update(self.feed.open())
        self.process, self.pid, self.channel = process, process.pid, channel
        self.started_at = time.monotonic()
        logger.debug("started worker %d (pid %d)", self.index, process.pid)
        try:
            await channel.send(start)
        except ChannelClosedError:
            pass  # it exited already; wait() below collects its status
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._read_messages, channel, on_ready)
                if self.feed is not None:
                    group.start_soon(self.feed.run, channel)
                code = await process.wait()
                group.cancel_scope.cancel()
        finally:
            # Also when the supervisor is cancelled, so the channel is closed.
            if self.feed is not None:
                self.feed.close()
            with anyio.CancelScope(shield=True):
                await self._forget_process()
        return code

    async def request(
        self, message: Message, wait_seconds: float, fds: list[int] | None = None
    ) -> Message | None:
        """Send a request to the worker; return its reply, or None on failure."""
        channel = self.channel
        if channel is None or not self.ready:
            return None
        self._next_id += 1
        request_id = self._next_id
        event, replies = anyio.Event(), list[Message]()
        self._pending[request_id] = (event, replies)
        try:
            await channel.send({**message, "id": request_id}, fds)
            with anyio.move_on_after(wait_seconds):
                await event.wait()
        except ChannelClosedError:
            pass
        finally:
            self._pending.pop(request_id, None)
        return replies[0] if replies else None

    def take_counters(self) -> Snapshot | None:
        """Return the counters of the last snapshot of an exited process, once.

        Gauges (endpoint readings, open connections) are dropped, because
        they describe a process that no longer runs.
        """
        if self.last_snapshot is None:
            return None
        counters = Snapshot.from_wire(self.last_snapshot.to_wire())
        counters.endpoints.clear()
        counters.connections = {
            name: (opened, 0, rejected)
            for name, (opened, _, rejected) in counters.connections.items()
        }
        counters.processes = 0
        self.last_snapshot = None
        return counters

    async def _forget_process(self) -> None:
        if self.channel is not None:
            await self.channel.aclose()
        self.channel, self.process, self.ready = None, None, False
        for event, _ in self._pending.values():
            event.set()
        self._pending.clear()

    async def _read_messages(
        self, channel: Channel, on_ready: Callable[[WorkerSlot], None]
    ) -> None:
        try:
            while True:
                message, fds = await channel.receive()
                for fd in fds:
                    os.close(fd)  # workers never send descriptors
                if message["op"] == "ready":
                    self.ready = True
                    on_ready(self)
                    continue
                if message["op"] == REPORT_OP:
                    if self.feed is not None:
                        self.feed.receive_report(message, f"worker {self.index}")
                    continue
                waiter = self._pending.pop(int(message.get("id") or -1), None)
                if waiter is not None:
                    waiter[1].append(message)
                    waiter[0].set()
        except ChannelClosedError:
            return


def send_signal(process: anyio.abc.Process, signum: signal.Signals) -> None:
    """Send a signal to a worker process unless it has exited."""
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass  # it exited already


def describe_exit(code: int | None) -> str:
    """Describe a process exit status for the log ("signal SIGKILL", "exit code 1")."""
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def bind_slots(listeners: Iterable[Listener], slots: Sequence[WorkerSlot]) -> list[str]:
    """Bind each listener once per slot; return one log line per listener.

    Raises OSError, after closing the sockets bound so far, when a bind fails.
    """
    lines = []
    try:
        for listener in listeners:
            sockets = bind_listener(listener, len(slots))
            for slot, sock in zip(slots, sockets, strict=True):
                slot.sockets[listener.name] = sock
            address = bound_address(sockets[0])
            lines.append(f'listener "{listener.name}" listening on {address}')
    except OSError:
        close_slot_sockets(slots)
        raise
    return lines


def close_slot_sockets(
    slots: Sequence[WorkerSlot], names: Sequence[str] | None = None
) -> None:
    """Close the slots' listening sockets of `names` (all by default)."""
    closed: set[int] = set()
    for slot in slots:
        for name in list(slot.sockets):
            if names is None or name in names:
                sock = slot.sockets.pop(name)
                # Without SO_REUSEPORT every slot holds the same socket.
                if id(sock) not in closed:
                    closed.add(id(sock))
                    sock.close()
