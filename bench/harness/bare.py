"""The bare proxy (bench/bare_proxy.py) as a benchmark target.

It is started with the interpreter running the harness, listens on port 0 and
proxies to the upstream's main port. The harness reads the real port from its
`bare proxy listening on HOST:PORT` line. It has one upstream only, so it
cannot serve the consistent-hash scenario.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from harness.nginx import Upstream
from harness.processes import BenchError, Process, wait_for_line

SCRIPT = Path(__file__).resolve().parent.parent / "bare_proxy.py"
READY = "bare proxy listening on"
_READY_RE = re.compile(rf"{READY} (\S+):(\d+)")
UNSUPPORTED_SCENARIOS = {"hash-3": "it proxies to one upstream only"}


def start_bare(
    workdir: Path, upstream: Upstream, *, cpu: int | None, name: str = "bare"
) -> tuple[Process, int]:
    """Start the bare proxy in front of `upstream`, and return it and its port."""
    command = [
        sys.executable, str(SCRIPT), "--upstream", f"127.0.0.1:{upstream.port}",
    ]  # fmt: skip
    process = Process(name, command, workdir, cpu=cpu)
    try:
        lines = wait_for_line(process, READY, timeout_s=30.0)
    except BenchError:
        process.stop()
        raise
    for line in lines:
        match = _READY_RE.search(line)
        if match:
            return process, int(match.group(2))
    process.stop()
    raise BenchError(f"the bare proxy wrote no {READY!r} line with a port")
