"""Tests of the supervisor: worker count, worker settings, reload rollback."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import anyio
import pytest

from pgproxy.server.loading import load_config
from pgproxy.server.slots import describe_exit
from pgproxy.server.worker import ENVIRONMENT_VARIABLE, WorkerSettings
from pgproxy.server.workers import Supervisor, worker_count


def test_worker_count_number() -> None:
    assert worker_count(3) == 3


def test_worker_count_auto_uses_cpus() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1

    assert worker_count("auto") == expected


def test_settings_round_trip() -> None:
    settings = WorkerSettings("/etc/pgproxy.toml", 1, 7, {"main": 8, "tls": 9}, "DEBUG")

    decoded = WorkerSettings.from_environment(
        {ENVIRONMENT_VARIABLE: settings.to_environment()}
    )

    assert decoded == settings


def test_settings_missing_raise() -> None:
    with pytest.raises(KeyError):
        WorkerSettings.from_environment({})


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0, "exit code 0"),
        (1, "exit code 1"),
        (-9, "signal SIGKILL"),
        (None, "an unknown status"),
    ],
)
def test_describe_exit(code: int | None, text: str) -> None:
    assert describe_exit(code) == text


# A worker that speaks the control protocol and rejects any graph with a
# listener "extra" when its index is 1; it appends "INDEX HASH" per reload to
# a log.
STUB_WORKER = """
import base64, os, sys
import anyio
from pgproxy.server.control import Channel, ChannelClosedError
from pgproxy.server.loading import decode_loaded
from pgproxy.server.worker import WorkerSettings, receive_start

async def main():
    settings = WorkerSettings.from_environment()
    channel = await Channel.open(settings.control_fd)
    await receive_start(channel)
    await channel.send({"op": "ready", "pid": os.getpid()})
    while True:
        try:
            message, fds = await channel.receive()
        except ChannelClosedError:
            return
        for fd in fds:
            os.close(fd)
        payload = base64.b64decode(message["config"])
        loaded = decode_loaded(payload, settings.config)
        with open(sys.argv[1], "a") as log:
            log.write(f"{settings.index} {loaded.config_hash}\\n")
        ok = settings.index == 0 or "extra" not in loaded.graph.listeners
        error = None if ok else "rejected by the stub worker"
        reply = {"op": "reload", "id": message["id"], "ok": ok, "error": error}
        await channel.send(reply)

anyio.run(main)
"""

STUB_CONFIG = """
[listeners.main]
address = "127.0.0.1:0"

[[routes]]
cluster = "api"

[clusters.api]
endpoints = ["127.0.0.1:9"]
"""


@pytest.mark.anyio
async def test_rejected_reload_rolls_back(tmp_path: Path) -> None:
    stub, log, config = (
        tmp_path / "stub.py",
        tmp_path / "reloads.log",
        tmp_path / "p.toml",
    )
    stub.write_text(STUB_WORKER)
    config.write_text(STUB_CONFIG)
    loaded, payload = load_config(str(config))
    command = [sys.executable, str(stub), str(log)]
    supervisor = Supervisor(str(config), loaded, payload, 2, worker_command=command)
    supervisor.bind_all()
    rejected = STUB_CONFIG + '# rejected\n[listeners.extra]\naddress = "127.0.0.1:0"\n'

    async with anyio.create_task_group() as group:
        for slot in supervisor.slots:
            group.start_soon(supervisor.keep_running, slot)
        with anyio.fail_after(20):
            # Polled: the supervisor's readiness event is private.
            while not all(slot.ready for slot in supervisor.slots):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        config.write_text(rejected)
        ok = await supervisor.reload("test")
        await supervisor.drain()
        group.cancel_scope.cancel()

    new_hash = hashlib.sha256(rejected.encode()).hexdigest()
    assert ok is False
    assert supervisor.loaded.config_hash == loaded.config_hash
    assert supervisor.history.config_hash == loaded.config_hash
    assert supervisor.history.last_outcome == "failure"
    assert sorted(log.read_text().splitlines()) == sorted(
        [f"0 {new_hash}", f"1 {new_hash}", f"0 {loaded.config_hash}"]
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
