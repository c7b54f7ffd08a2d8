"""Run `pgproxy run CONFIG` as a child process and watch its output.

The process runs under the test's own interpreter. Threads read its stdout
(access log, one JSON object per line) and stderr (process log), so the
pipes never fill. Readiness comes from the log lines every `pgproxy run`
writes: `listener "NAME" listening on HOST:PORT` for each listener, then
`pgproxy ready`. Stopping sends SIGTERM, waits a
bounded time, then SIGKILL, always by pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import pytest

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
_LISTENING_RE = re.compile(r'listener "([^"]+)" listening on (\S+)')

PgproxyFactory = Callable[..., "PgproxyProcess"]


class PgproxyProcess:
    """One `pgproxy run` child process and the lines it has written."""

    def __init__(
        self,
        config_path: Path,
        extra_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.config_path = config_path
        self.env = dict(env or {})
        # Working directory of the child; None keeps the test's own.
        self.cwd = cwd
        self.args = [
            sys.executable,
            "-m",
            "pgproxy",
            "run",
            str(config_path),
            *extra_args,
        ]
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.ports: dict[str, int] = {}
        self.changed = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self._readers: list[threading.Thread] = []

    def __repr__(self) -> str:
        return f"<PgproxyProcess pid={self.pid} ports={self.ports}>"

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start the process and its output readers, without waiting for readiness."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", NO_COLOR="1", **self.env)
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=env,
            cwd=self.cwd,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, lines in (
            (self.proc.stdout, self.stdout_lines),
            (self.proc.stderr, self.stderr_lines),
        ):
            reader = threading.Thread(
                target=self._read_lines, args=(stream, lines), daemon=True
            )
            reader.start()
            self._readers.append(reader)

    def _read_lines(self, stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            with self.changed:
                lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for the ready line and record each listener's port; fail with stderr."""
        line = self.wait_for_stderr("pgproxy ready", timeout)
        if line is None:
            self.kill()
            pytest.fail(
                f"pgproxy did not log 'pgproxy ready' within {timeout}s "
                f"(exit code {self.proc.returncode if self.proc else None}); "
                f"stderr:\n{self.stderr_text()}",
                pytrace=False,
            )
        with self.changed:
            for text in self.stderr_lines:
                match = _LISTENING_RE.search(text)
                if match:
                    _, _, port = match.group(2).rpartition(":")
                    self.ports[match.group(1)] = int(port)

    def port(self, listener: str = "main") -> int:
        """Return the port listener `listener` reported; fail when it was not logged."""
        if listener not in self.ports:
            pytest.fail(
                f'pgproxy never logged `listener "{listener}" listening on HOST:PORT`; '
                f"stderr:\n{self.stderr_text()}",
                pytrace=False,
            )
        return self.ports[listener]

    def _wait_for_line(
        self,
        lines: list[str],
        predicate: Callable[[str], bool],
        timeout: float,
        start: int = 0,
    ) -> str | None:
        deadline = time.monotonic() + timeout
        with self.changed:
            index = start
            while True:
                while index < len(lines):
                    if predicate(lines[index]):
                        return lines[index]
                    index += 1
                remaining = deadline - time.monotonic()
                exited = self.proc is not None and self.proc.poll() is not None
                if remaining <= 0 or (
                    exited and all(not r.is_alive() for r in self._readers)
                ):
                    return None
                self.changed.wait(min(remaining, 0.1))

    def wait_for_stderr(
        self, text: str, timeout: float = 5.0, start: int = 0
    ) -> str | None:
        """Return the first stderr line from index `start` containing `text`."""
        return self._wait_for_line(
            self.stderr_lines, lambda line: text in line, timeout, start
        )

    def stderr_text(self) -> str:
        """Return everything written to stderr so far."""
        with self.changed:
            return "\n".join(self.stderr_lines)

    def access_records(self) -> list[dict[str, Any]]:
        """Return every stdout line that parses as a JSON object."""
        records = []
        with self.changed:
            lines = list(self.stdout_lines)
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def wait_for_access(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 5.0,
        count: int = 1,
    ) -> list[dict[str, Any]]:
        """Wait until `count` access records match `predicate`; fail if they do not."""
        deadline = time.monotonic() + timeout
        while True:
            matches = [r for r in self.access_records() if predicate(r)]
            if len(matches) >= count:
                return matches
            if time.monotonic() >= deadline:
                recent = "\n".join(self.stdout_lines[-10:])
                pytest.fail(
                    f"expected {count} matching access log records within {timeout}s, "
                    f"found {len(matches)}; last stdout lines:\n{recent}",
                    pytrace=False,
                )
            time.sleep(0.05)

    def access_for_path(self, path: str, timeout: float = 5.0) -> dict[str, Any]:
        """Return the one access record whose `path` equals `path`."""
        return self.wait_for_access(lambda r: r.get("path") == path, timeout)[-1]

    def vm_hwm_kib(self) -> int:
        """Return the peak resident set size (VmHWM) in KiB of pgproxy's processes.

        With worker processes the largest peak among the main process and its
        children is returned, because each worker has its own buffers.
        """
        peaks = []
        for pid in [self.pid, *_child_pids(self.pid)]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                continue
            match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            assert match, f"no VmHWM in /proc/{pid}/status"
            peaks.append(int(match.group(1)))
        return max(peaks)

    def signal(self, signum: int) -> None:
        """Send `signum` to the child by pid."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Wait for the child to exit; return its exit code, None on timeout."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit code."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        code = self.wait_exit(timeout)
        if code is None:
            self.kill()
        self._close_pipes()
        return code

    def kill(self) -> None:
        """SIGKILL the child by pid and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for reader in self._readers:
            reader.join(5)
        assert self.proc is not None
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children.extend(int(text) for text in task.read_text().split())
    return children


def write_config(directory: Path, text: str, name: str = "pgproxy.toml") -> Path:
    """Write config `text` to `directory/name` and return the path."""
    path = directory / name
    path.write_text(text)
    return path


def start_pgproxy(
    directory: Path, config_text: str, *extra_args: str
) -> PgproxyProcess:
    """Write the config, start pgproxy and wait until it is ready."""
    process = PgproxyProcess(write_config(directory, config_text), extra_args)
    process.start()
    process.wait_ready()
    return process
