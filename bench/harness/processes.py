"""Start and stop the benchmark's processes, each pinned to a CPU core.

Every process is started in its own session with stdout and stderr going to
files in the run's temporary directory, and is stopped by its pid: SIGTERM,
then SIGKILL after a bounded wait. Nothing is ever signalled by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from harness import procfs


class BenchError(Exception):
    """A benchmark step failed; the message names the step and the cause."""


# Ports this process has handed out: the kernel may offer a closed port again
# at once, and nginx fails on two `listen` lines with the same port.
_HANDED_OUT: set[int] = set()
_PORT_ATTEMPTS = 50


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is found by binding port 0 and closing the socket, so another
    process could take it before the caller binds it. For servers that cannot
    bind port 0 themselves (nginx) this small race is accepted. A port is
    never returned twice by one process.
    """
    for _ in range(_PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise BenchError(f"no new free port after {_PORT_ATTEMPTS} attempts")


def pinned(command: Sequence[str], cpu: int | None) -> list[str]:
    """Prefix `command` with `taskset -c CPU` when pinning is possible."""
    if cpu is None or shutil.which("taskset") is None:
        return list(command)
    return ["taskset", "-c", str(cpu), *command]


class Process:
    """A child process with its output in log files, stopped by pid."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        workdir: Path,
        *,
        cpu: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = pinned(command, cpu)
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        with (
            self.stdout_path.open("wb") as stdout,
            self.stderr_path.open("wb") as stderr,
        ):
            self.popen = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=workdir,
                env=env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """Process id of the started command (taskset execs into it)."""
        return self.popen.pid

    def __repr__(self) -> str:
        return f"Process({self.name!r}, pid={self.pid}, alive={self.alive()})"

    def alive(self) -> bool:
        """Return True while the process has not exited."""
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        """Return the last lines of the process's stderr, for error messages."""
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def tree_memory(self) -> procfs.TreeMemory:
        """Read the memory of this process and its children."""
        return procfs.tree_memory(self.pid)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Send SIGTERM, wait up to `timeout_s`, then SIGKILL; return the exit code.

        Children still alive after the process exited (workers it failed to
        stop) are killed too.
        """
        if not self.alive():
            return self.popen.wait(timeout_s)
        tree = [(pid, procfs.start_ticks(pid)) for pid in procfs.process_tree(self.pid)]
        os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            _kill(tree)
            return self.popen.wait(timeout_s)
        deadline = time.monotonic() + timeout_s
        while _alive(tree[1:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        _kill(tree[1:])
        return code


def _alive(tree: list[tuple[int, int | None]]) -> list[tuple[int, int | None]]:
    """Return the processes of `tree` still running, matched by pid and start time."""
    return [(pid, ticks) for pid, ticks in tree if procfs.start_ticks(pid) == ticks]


def _kill(tree: list[tuple[int, int | None]]) -> None:
    for pid, _ in reversed(_alive(tree)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_port(process: Process, port: int, timeout_s: float = 15.0) -> None:
    """Wait until 127.0.0.1:`port` accepts connections or the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise BenchError(
                f"{process.name} exited with code {process.popen.returncode} "
                f"before listening on port {port}:\n{process.tail()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(
        f"{process.name} did not listen on port {port} within {timeout_s:.0f} s"
    )


def wait_for_line(process: Process, marker: str, timeout_s: float = 15.0) -> list[str]:
    """Wait until the process's stderr contains `marker`; return stderr's lines."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = process.stderr_path.read_text(errors="replace")
        if marker in text:
            return text.splitlines()
        if not process.alive():
            raise BenchError(
                f"{process.name} exited with code {process.popen.returncode} "
                f"before logging {marker!r}:\n{process.tail()}"
            )
        time.sleep(0.05)
    raise BenchError(
        f"{process.name} did not log {marker!r} within {timeout_s:.0f} s:\n"
        f"{process.tail()}"
    )
