"""pgproxy as a benchmark target: its config and its process.

pgproxy is started with the interpreter running the harness (`python -m
pgproxy run`), with a listener on port 0; the real port is read from its
`listener "bench" listening on HOST:PORT` log line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from harness.nginx import Upstream
from harness.processes import BenchError, Process, wait_for_line

LISTENER = "bench"
_LISTENING_RE = re.compile(rf'listener "{LISTENER}" listening on (\S+):(\d+)')


def pgproxy_config(upstream: Upstream, *, workers: int, access_log: str) -> str:
    """Return a config that serves the same paths as the nginx proxy."""
    ring = ", ".join(f'"127.0.0.1:{port}"' for port in upstream.ring_ports)
    return f"""\
[server]
workers = {workers}
access_log = "{access_log}"
drain_timeout = "2s"

[listeners.{LISTENER}]
address = "127.0.0.1:0"

[[routes]]
name = "ring"
path_prefix = "/hash"
cluster = "ring"

[[routes]]
name = "single"
cluster = "single"

[clusters.single]
endpoints = ["127.0.0.1:{upstream.port}"]
max_idle_connections = 128

[clusters.ring]
endpoints = [{ring}]
balancer = "consistent_hash"
hash_key = "query:k"
max_idle_connections = 128
"""


def start_pgproxy(
    workdir: Path,
    upstream: Upstream,
    *,
    cpu: int | None,
    workers: int = 1,
    access_log: str = "off",
    name: str = "pgproxy",
) -> tuple[Process, int]:
    """Start `pgproxy run`, wait for `pgproxy ready`; return it and its port."""
    config_path = workdir / f"{name}.toml"
    config_path.write_text(
        pgproxy_config(upstream, workers=workers, access_log=access_log)
    )
    command = [sys.executable, "-m", "pgproxy", "run", str(config_path)]
    process = Process(name, command, workdir, cpu=cpu)
    try:
        lines = wait_for_line(process, "pgproxy ready", timeout_s=30.0)
    except BenchError:
        process.stop()
        raise
    for line in lines:
        match = _LISTENING_RE.search(line)
        if match:
            return process, int(match.group(2))
    process.stop()
    raise BenchError(f'pgproxy logged no "listener {LISTENER} listening on" line')


def request_path() -> str:
    """Return how pgproxy's request path runs here: compiled, or Python and why."""
    result = subprocess.run(
        [sys.executable, "-c", "import pgproxy.compiled as c; print(c.REQUEST_PATH)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout.strip() or f"unknown ({result.stderr.strip()[-200:]})"


def pgproxy_version() -> str:
    """Return the installed pgproxy version and the git commit of its tree."""
    version = metadata.version("pgproxy")
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version} (git {commit})"
