"""The worker side of the control channel, and the worker's start-up settings.

A worker process gets its settings from the `PGPROXY_WORKER` environment
variable (JSON: config path, worker index, control channel descriptor and
one listening socket descriptor per listener, all inherited). The first
message on the channel, `start`, carries the graph in force as the config
loader pickled it (see `pgproxy.server.loading`), so a worker restarted after
the file was edited still runs the config that the supervisor validated, and
no worker imports pydantic. It also carries the supervisor's active-check
state and the ejections in force, so a worker starts with the endpoints
that are down already marked down. The worker then serves the data plane on
those sockets and replies to the supervisor's requests:

- `snapshot`: metrics snapshot and health table snapshot of this worker;
- `reload`: install the graph the supervisor loaded,
  with the sockets of added listeners attached.

Three messages get no reply and are applied in the order they arrive,
because the health state depends on that order (see
`pgproxy.health.shared`):

- `probes`: outcomes of the supervisor's probes, to record;
- `probe_state`: the supervisor's whole active-check state, to take over;
- `ejections`: ejections the supervisor started or ended, to take over.

The worker sends one message of its own, `outcomes`: the outcomes of its
traffic, batched by `ReportSender` (see `pgproxy.health.reports`).

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

from pgproxy.health.reports import FLUSH_DELAY_S, OutcomeReport, encode_report
from pgproxy.health.shared import (
    EJECTIONS_OP,
    OUTCOMES_OP,
    STATE_OP,
    Ejection,
    EndpointProbeState,
    ProbeOutcome,
    decode_ejections,
    decode_outcomes,
    decode_probe_state,
)
from pgproxy.server.control import (
    MAX_MESSAGE_BYTES,
    Channel,
    ChannelClosedError,
    Message,
)

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

    def apply_probe_outcomes(self, outcomes: list[ProbeOutcome]) -> None:
        """Record the supervisor's probe outcomes in the health table in force."""
        ...

    def restore_probe_state(self, states: list[EndpointProbeState]) -> None:
        """Take over the supervisor's active-check state of every endpoint."""
        ...

    def apply_ejections(self, ejections: list[Ejection]) -> None:
        """Take over ejections that the supervisor started or ended."""
        ...

    def request_shutdown(self) -> None:
        """Start draining, as on SIGTERM."""
        ...


@dataclass(frozen=True)
class StartMessage:
    """The supervisor's first message: the config and the health to start from.

    `probe_state` is None when the supervisor does not decide health for the
    worker; the worker then runs its own probes and ejections.
    """

    payload: bytes
    probe_state: list[EndpointProbeState] | None
    ejections: list[Ejection]


def payload_fits(payload: bytes) -> bool:
    """Return whether a loader's payload fits in one control message."""
    encoded = (len(payload) + 2) // 3 * 4
    return encoded + 4096 <= MAX_MESSAGE_BYTES


def oversized_message(path: str, payload: bytes) -> str:
    """Describe a payload that `payload_fits` rejected."""
    return (
        f"{path} builds a graph of {len(payload) / 2**20:.1f} MiB, too large to "
        f"send to the workers (at most {MAX_MESSAGE_BYTES // 2**20} MiB encoded)"
    )


def encode_config(data: bytes) -> str:
    """Encode a loader's payload for a control message."""
    return base64.b64encode(data).decode("ascii")


async def receive_start(channel: Channel) -> StartMessage:
    """Wait for the supervisor's `start` message and decode it.

    Raises ChannelClosedError when the channel closes, another op comes
    first, or the health state is malformed.
    """
    message, fds = await channel.receive()
    for fd in fds:
        os.close(fd)
    if message["op"] != "start":
        raise ChannelClosedError(f"expected a start message, got {message['op']!r}")
    state = message.get("probe_state")
    try:
        probe_state = None if state is None else decode_probe_state(state)
        ejections = decode_ejections(message.get("ejections", []))
    except ValueError as error:
        raise ChannelClosedError(f"malformed health state: {error}") from None
    payload = base64.b64decode(message["config"])
    return StartMessage(payload, probe_state, ejections)


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
            if message["op"] in _HEALTH_OPS and not fds:
                _apply_health(host, message)
            else:
                group.start_soon(_answer, channel, host, message, fds)


class ReportSender:
    """Sends the worker's traffic report to the supervisor, batched.

    A report goes out `delay` seconds after its first outcome, or at once
    when it is full, so the request path only adds to it and one message
    carries every outcome of that time.
    """

    def __init__(self, report: OutcomeReport, delay: float = FLUSH_DELAY_S) -> None:
        self._report = report
        self._delay = delay
        self._wake = anyio.Event()
        report.on_pending = self._notify
        self.sent = 0  # messages

    def __repr__(self) -> str:
        return f"<ReportSender sent={self.sent} {self._report!r}>"

    def _notify(self) -> None:
        self._wake.set()

    async def run(self, channel: Channel) -> None:
        """Send each report when it is due, until the channel closes."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if not self._report.full:
                # Set again only when the report becomes full.
                with anyio.move_on_after(self._delay):
                    await self._wake.wait()
                self._wake = anyio.Event()
            outcomes = self._report.take()
            if not outcomes:
                continue
            try:
                await channel.send(encode_report(outcomes))
            except ChannelClosedError:
                return  # serve_control gets ChannelClosedError too, and drains
            self.sent += 1


_HEALTH_OPS = (OUTCOMES_OP, STATE_OP, EJECTIONS_OP)


def _apply_health(host: WorkerHost, message: Message) -> None:
    """Apply a health message at once, so the next one finds its effect."""
    try:
        if message["op"] == OUTCOMES_OP:
            host.apply_probe_outcomes(decode_outcomes(message))
        elif message["op"] == STATE_OP:
            host.restore_probe_state(decode_probe_state(message.get("state")))
        else:
            host.apply_ejections(decode_ejections(message.get("ejections")))
    except ValueError as error:
        # Skipping it can leave this worker's verdicts behind the supervisor's
        # until the thresholds are crossed again or the ejection ends.
        logger.error(
            "ignored an invalid %s message from the supervisor: %s",
            message["op"],
            error,
        )


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
