"""End-to-end tests of SIGHUP sent while `pgproxy run` starts.

A SIGHUP that arrives before the reload handler is installed must neither
end the process nor be lost: it causes one reload right after start-up,
however many were sent.

To send it at a known point without racing the start-up, the tests hold
pgproxy's child processes with a `sitecustomize` module that they put on
PYTHONPATH (the loader child and the workers inherit the environment).
The config loader of the first load is held after it printed the graph and
before it exits, so the serving process provably still waits for it, with
the file already read. With `workers = 2` a worker is also held before its
first import, so the supervisor provably waits for it, with its signal
receiver open. A hold ends when the test creates the gate file, or after
`HOLD_LIMIT_S` as a safety bound. pgproxy itself has no test hook.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
from e2e_admin import get
from e2e_process import PgproxyProcess

HOLD_LIMIT_S = 30.0
WAIT_S = 15.0

SITECUSTOMIZE = f"""
import atexit, os, sys, time
from pathlib import Path

GATES = Path(os.environ["PGPROXY_TEST_GATES"])


def hold(name):
    # One marker per process, then wait until the test opens the gate.
    (GATES / f"{{name}}-{{os.getpid()}}").touch()
    deadline = time.monotonic() + {HOLD_LIMIT_S}
    while not (GATES / f"{{name}}.open").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


if "pgproxy.graph.compile" in sys.orig_argv:
    atexit.register(hold, "loader")
elif "pgproxy.server.worker_main" in sys.orig_argv:
    hold("worker")
"""

CONFIG = """
[server]
workers = {workers}
access_log = "off"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
respond = {{ status = 200, body = "{version}" }}
"""


class Gates:
    """The folder of markers and gate files that the held processes use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()

    def wait_held(self, name: str, process: PgproxyProcess) -> None:
        """Wait until a process named `name` has reached its hold."""
        deadline = time.monotonic() + WAIT_S
        while not list(self.folder.glob(f"{name}-*")):
            assert process.proc is not None
            if process.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"no {name} process reached its hold; stderr:\n"
                    f"{process.stderr_text()}",
                    pytrace=False,
                )
            time.sleep(0.02)

    def open(self, name: str) -> None:
        """Let every held process named `name` go on, and later ones pass."""
        (self.folder / f"{name}.open").touch()

    def count(self, name: str) -> int:
        """Return how many processes named `name` have started."""
        return len(list(self.folder.glob(f"{name}-*")))


def _config(workers: int, version: str) -> str:
    return CONFIG.format(workers=workers, version=version)


def _hash_prefix(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _replace(path: Path, text: str) -> None:
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def _start_held(tmp_path: Path, workers: int) -> tuple[PgproxyProcess, Gates]:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    gates = Gates(tmp_path / "gates")
    path = tmp_path / "pgproxy.toml"
    path.write_text(_config(workers, "v1"))
    python_path = os.pathsep.join(
        item for item in (str(hooks), os.environ.get("PYTHONPATH")) if item
    )
    env = {"PYTHONPATH": python_path, "PGPROXY_TEST_GATES": str(gates.folder)}
    process = PgproxyProcess(path, env=env)
    process.start()
    return process, gates


def _wait_reloaded(process: PgproxyProcess, text: str) -> None:
    line = process.wait_for_stderr(f"(hash {_hash_prefix(text)})", WAIT_S)
    assert line is not None, f"no reload of {text!r}; stderr:\n{process.stderr_text()}"
    assert "reloaded" in line, line


def _served(process: PgproxyProcess, requests: int) -> set[bytes]:
    bodies = set()
    for _ in range(requests):
        status, body, _ = get(process.port("main"), "/")
        assert status == 200, body
        bodies.add(body)
    return bodies


@pytest.mark.parametrize(
    ("workers", "during_worker_start"), [(1, False), (2, False), (2, True)]
)
def test_sighup_during_start_reloads_once(
    tmp_path: Path, workers: int, during_worker_start: bool
) -> None:
    process, gates = _start_held(tmp_path, workers)
    if not during_worker_start:
        gates.open("worker")
    try:
        gates.wait_held("loader", process)
        assert process.wait_for_stderr("listening on", timeout=0) is None
        _replace(process.config_path, _config(workers, "v2"))
        for _ in range(3):
            process.signal(signal.SIGHUP)
        gates.open("loader")
        if during_worker_start:
            # The SIGHUP held during the load was delivered before the
            # workers started, so these are received as separate signals.
            gates.wait_held("worker", process)
            assert process.wait_for_stderr("pgproxy ready", timeout=0) is None
            for _ in range(3):
                process.signal(signal.SIGHUP)
            gates.open("worker")
        process.wait_ready()

        _wait_reloaded(process, _config(workers, "v2"))
        assert _served(process, 4 * workers) == {b"v2"}

        # A later SIGHUP orders itself after any reload still queued, so the
        # count of reloads up to its outcome shows whether the early ones
        # caused more than one.
        v3 = _config(workers, "v3")
        _replace(process.config_path, v3)
        process.signal(signal.SIGHUP)
        _wait_reloaded(process, v3)
        assert _served(process, 4 * workers) == {b"v3"}
        lines = process.stderr_text().splitlines()
        assert sum("reloading" in line for line in lines) == 2, lines
        assert not any("reload failed" in line for line in lines), lines
        assert gates.count("loader") == 3
    finally:
        gates.open("loader")
        gates.open("worker")
        code = process.stop()
    assert code == 0
