"""The worker side of the control channel, and the worker's start-up settings.

A worker process gets its settings from the `PGPROXY_WORKER` environment
variable (JSON: config path, worker index, control channel descriptor and
one listening socket descriptor per listener, all inherited). The first
message on the channel, `start`, carries the graph in force as the config
loader pickled it (see `pgproxy.server.loading`), so a worker restarted after
the file was edited still runs the config that the supervisor validated, and
no worker imports pydantic. It then serves the data plane on those sockets and
replies to the supervisor's requests:

- `snapshot`: metrics snapshot and health table snapshot of this worker;
- `reload`: install the graph the supervisor loaded,
  with the sockets of added listeners attached.

When the channel closes (the supervisor is gone) the worker drains and exits.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from pgproxy.server.control import Channel, ChannelClosedError, Message

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "PGPROXY_WORKER"


@dataclass(frozen=True)
class WorkerSettings:
    """Start-up settings that a worker process gets from its supervisor."""

    config: str
    index: int
    control_fd: int
    listener_fds: Mapping[str, int]
    log_level: str = "INFO"

    def to_environment(self) -> str:
        """Encode the settings for the `PGPROXY_WORKER` environment variable."""
        return json.dumps(
            {
                "config": self.config,
                "index": self.index,
                "control_fd": self.control_fd,
                "listener_fds": dict(self.listener_fds),
                "log_level": self.log_level,
            }
        )

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None
    ) -> WorkerSettings:
        """Decode the settings; raises KeyError or ValueError when absent or bad."""
        data = json.loads((environ or os.environ)[ENVIRONMENT_VARIABLE])
        return cls(
            config=str(data["config"]),
            index=int(data["index"]),
            control_fd=int(data["control_fd"]),
            listener_fds={str(k): int(v) for k, v in data["listener_fds"].items()},
            log_level=str(data.get("log_level", "INFO")),
        )

    def listener_sockets(self) -> dict[str, socket.socket]:
        """Wrap the inherited listening descriptors as socket objects."""
        return {
            name: socket.socket(fileno=fd) for name, fd in self.listener_fds.items()
        }


class WorkerHost(Protocol):
    """The serving worker, as the control channel uses it."""

    def metrics_snapshot(self) -> dict[str, Any]:
        """Return the metrics snapshot in wire form (`Snapshot.to_wire`)."""
        ...

    def health_snapshot(self) -> Mapping[str, Any]:
        """Return `HealthTable.snapshot()` of the graph in force."""
        ...

    async def reload(
        self, payload: bytes, added: Mapping[str, socket.socket]
    ) -> tuple[bool, str | None, str | None]:
        """Install a loader's `payload`; return (ok, config hash, error message)."""
        ...

    def request_shutdown(self) -> None:
        """Start draining, as on SIGTERM."""
        ...


def encode_config(data: bytes) -> str:
    """Encode a loader's payload for a control message."""
    return base64.b64encode(data).decode("ascii")


async def receive_start(channel: Channel) -> bytes:
    """Wait for the supervisor's `start` message; return the loader's payload.

    Raises ChannelClosedError when the channel closes or another op comes first.
    """
    message, fds = await channel.receive()
    for fd in fds:
        os.close(fd)
    if message["op"] != "start":
        raise ChannelClosedError(f"expected a start message, got {message['op']!r}")
    return base64.b64decode(message["config"])


async def serve_control(channel: Channel, host: WorkerHost) -> None:
    """Reply to the supervisor's requests until the channel closes.

    Call it once the worker serves, because it first sends `ready`.
    """
    try:
        await channel.send({"op": "ready", "pid": os.getpid()})
    except ChannelClosedError:
        _supervisor_gone(host)
        return
    async with anyio.create_task_group() as group:
        while True:
            try:
                message, fds = await channel.receive()
            except ChannelClosedError:
                _supervisor_gone(host)
                return
            group.start_soon(_answer, channel, host, message, fds)


def _supervisor_gone(host: WorkerHost) -> None:
    logger.warning("the supervisor closed the control channel; draining")
    host.request_shutdown()


async def _answer(
    channel: Channel, host: WorkerHost, message: Message, fds: list[int]
) -> None:
    op = message["op"]
    reply: Message = {"op": op, "id": message.get("id")}
    if op == "snapshot":
        reply["metrics"] = host.metrics_snapshot()
        reply["health"] = host.health_snapshot()
    elif op == "reload":
        names = [str(name) for name in message.get("listeners", [])]
        added = {
            name: socket.socket(fileno=fd) for name, fd in zip(names, fds, strict=True)
        }
        payload = base64.b64decode(message["config"])
        ok, config_hash, error = await host.reload(payload, added)
        reply.update(ok=ok, hash=config_hash, error=error)
    else:
        for fd in fds:
            os.close(fd)
        reply["error"] = f"unknown control operation {op!r}"
    try:
        await channel.send(reply)
    except ChannelClosedError:
        pass  # the receive loop gets ChannelClosedError too
