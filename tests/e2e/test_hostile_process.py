"""`pgproxy run` started the way process managers, shells and packagers start it.

Each test starts a real `pgproxy run` process in front of a real upstream on
127.0.0.1 and checks that it serves and stops cleanly. The cases: a config
path that starts with a dash, stdin or stdout closed, a pgproxy importable
only because the launcher put it on `sys.path`, and SIGTERM while the config
loader child still runs.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_upstream import UpstreamFactory

import pgproxy

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
_LISTENING_RE = re.compile(r'listener "main" listening on \S+:(\d+)')


class _Run:
    """One `pgproxy run` process whose stderr is read by a thread."""

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        env: dict[str, str],
        stdout: int = subprocess.DEVNULL,
    ) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(
            args,
            cwd=cwd,
            env={**env, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"},
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def text(self) -> str:
        with self.changed:
            return "\n".join(self.lines)

    def wait_for(self, needle: str, timeout: float = READY_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not any(needle in line for line in self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reader.is_alive():
                    return False
                self.changed.wait(min(remaining, 0.2))
        return True

    def port(self) -> int:
        assert self.wait_for("pgproxy ready"), self.text()
        match = next(filter(None, map(_LISTENING_RE.search, self.text().splitlines())))
        return int(match.group(1))

    def stop(self) -> int:
        """SIGTERM by pid and return the exit code (SIGKILL when it hangs)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Join the reader and close the stderr pipe."""
        self._reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def runs() -> Iterator[list[_Run]]:
    """Processes a test started. Any still running at the end are stopped."""
    started: list[_Run] = []
    yield started
    for run in started:
        if run.proc.poll() is None:
            run.stop()
        run.close()


def _config(upstream: str, workers: int = 1) -> str:
    return (
        f"[server]\nworkers = {workers}\n\n"
        '[listeners.main]\naddress = "127.0.0.1:0"\n\n'
        '[[routes]]\npath_prefix = "/"\ncluster = "app"\n\n'
        f'[clusters.app]\nendpoints = ["{upstream}"]\n'
    )


def _get(port: int) -> int:
    url = f"http://127.0.0.1:{port}/hostile"
    with urllib.request.urlopen(url, timeout=5) as reply:
        reply.read()
        return int(reply.status)


def _pgproxy(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgproxy", "run", *args]


def _closing(redirect: str, command: list[str]) -> list[str]:
    """Run `command` through sh with `redirect` (such as `>&-`) applied."""
    return ["sh", "-c", f'exec "$0" "$@" {redirect}', *command]


def test_dash_config_path_is_served(
    tmp_path: Path, upstream_factory: UpstreamFactory, runs: list[_Run]
) -> None:
    (tmp_path / "-edge.toml").write_text(_config(upstream_factory().address))
    # A shell user writes `./-edge.toml`. The path reaches the serving process
    # as "-edge.toml", which must not be parsed as an option.
    run = _Run(_pgproxy("./-edge.toml"), tmp_path, dict(os.environ))
    runs.append(run)
    assert _get(run.port()) == 200
    assert run.stop() == 0, run.text()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("redirect", ["<&-", ">&-"])
def test_closed_std_stream_keeps_serving(
    tmp_path: Path,
    upstream_factory: UpstreamFactory,
    runs: list[_Run],
    redirect: str,
    workers: int,
) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text(_config(upstream_factory().address, workers))
    run = _Run(_closing(redirect, _pgproxy(str(config))), tmp_path, dict(os.environ))
    runs.append(run)
    port = run.port()
    assert [_get(port) for _ in range(4)] == [200] * 4
    assert run.stop() == 0, run.text()
    assert "Traceback" not in run.text()


def test_serving_process_uses_launcher_pgproxy(
    tmp_path: Path, upstream_factory: UpstreamFactory, runs: list[_Run]
) -> None:
    # A launcher (zipapp, pex, a vendoring wrapper) puts its own copy of
    # pgproxy on sys.path. Each process records which command imported it.
    copy = tmp_path / "vendored"
    source = Path(pgproxy.__file__).parent
    shutil.copytree(source, copy / "pgproxy", ignore=shutil.ignore_patterns("*.pyc"))
    marker = tmp_path / "imports.txt"
    with (copy / "pgproxy" / "__init__.py").open("a") as init:
        init.write(
            "\nimport os as _os, sys as _sys\n"
            "with open(_os.environ['PGPROXY_IMPORT_MARKER'], 'a') as _f:\n"
            "    _f.write(' '.join(_sys.orig_argv) + '\\n')\n"
        )
    config = tmp_path / "pgproxy.toml"
    config.write_text(_config(upstream_factory().address))
    launcher = (
        f"import sys; sys.path.insert(0, {str(copy)!r}); "
        "from pgproxy.cli.app import main; "
        f"sys.argv = ['pgproxy', 'run', {str(config)!r}]; main()"
    )
    env = {**os.environ, "PGPROXY_IMPORT_MARKER": str(marker)}
    env.pop("PYTHONPATH", None)
    run = _Run([sys.executable, "-c", launcher], tmp_path, env)
    runs.append(run)
    assert _get(run.port()) == 200
    assert run.stop() == 0, run.text()
    imported = marker.read_text()
    assert "pgproxy.graph.compile" in imported
    assert "pgproxy.server.main" in imported, imported


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.extend(int(item) for item in task.read_text().split())
        except FileNotFoundError:
            continue
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_sigterm_during_first_load_ends_loader(
    tmp_path: Path, upstream_factory: UpstreamFactory, runs: list[_Run]
) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text(_config(upstream_factory().address))
    run = _Run(_pgproxy(str(config)), tmp_path, dict(os.environ))
    runs.append(run)
    loader = None
    deadline = time.monotonic() + READY_TIMEOUT
    while loader is None and time.monotonic() < deadline:
        loader = next(
            (
                child
                for child in _children(run.proc.pid)
                if "pgproxy.graph.compile" in _cmdline(child)
            ),
            None,
        )
        time.sleep(0.005)
    assert loader is not None, "the config loader child was never seen"
    try:
        # A stopped loader cannot finish on its own, so only its parent can
        # end it, which it must do when it receives SIGTERM.
        os.kill(loader, signal.SIGSTOP)
        assert run.stop() == 0, run.text()
        deadline = time.monotonic() + STOP_TIMEOUT
        while _running(loader) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(loader), "the loader child outlived pgproxy"
    finally:
        if _running(loader):
            os.kill(loader, signal.SIGKILL)


@pytest.mark.parametrize("workers", [1, 2])
def test_unread_stdout_does_not_stop_serving(
    tmp_path: Path, upstream_factory: UpstreamFactory, runs: list[_Run], workers: int
) -> None:
    # `pgproxy run cfg | less` left unscrolled: the access log fills the
    # pipe (64 KiB) after a few hundred requests. Serving must go on.
    config = tmp_path / "pgproxy.toml"
    config.write_text(_config(upstream_factory().address, workers))
    run = _Run(_pgproxy(str(config)), tmp_path, dict(os.environ), subprocess.PIPE)
    runs.append(run)
    port = run.port()
    statuses: list[int] = []
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(1500):
            connection.request("GET", "/unread")
            reply = connection.getresponse()
            reply.read()
            statuses.append(reply.status)
    finally:
        connection.close()
    assert statuses == [200] * 1500
    assert run.wait_for("access log output is not being read", 10), run.text()
    assert run.stop() == 0, run.text()


@pytest.mark.parametrize("workers", [1, 2])
def test_port_in_use_fails_with_one_clear_line(
    tmp_path: Path, upstream_factory: UpstreamFactory, workers: int
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        config = tmp_path / "pgproxy.toml"
        text = _config(upstream_factory().address, workers)
        config.write_text(text.replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        done = subprocess.run(
            _pgproxy(str(config)),
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        taken.close()
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, done.stderr
    assert 'listener "main"' in errors[0]
    assert f"127.0.0.1:{port}" in errors[0]
    assert "Errno" not in errors[0]
