"""Run wrk against a URL and read its results from a Lua `done` hook.

wrk's own summary rounds latencies to two digits in mixed units. The `done`
hook below prints exact microsecond percentiles and the error counters as one
JSON line instead, and the harness parses that line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.processes import BenchError, pinned

_MARKER = "WRKJSON "
_PROBES = 3

_DONE_HOOK = """
done = function(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        '%s{"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, '
        .. '"connect_errors": %.0f, "read_errors": %.0f, "write_errors": %.0f, '
        .. '"status_errors": %.0f, "timeouts": %.0f, "p50_us": %.1f, '
        .. '"p99_us": %.1f, "mean_us": %.1f, "max_us": %.1f}\\n',
        "MARKER", summary.requests, summary.duration, summary.bytes,
        e.connect, e.read, e.write, e.status, e.timeout,
        latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
""".replace("MARKER", _MARKER)


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: counts, bytes and latency in microseconds."""

    requests: int
    duration_s: float
    response_bytes: int
    request_body_bytes: int
    errors: int
    p50_us: float
    p99_us: float
    mean_us: float

    @property
    def requests_per_s(self) -> float:
        """Completed requests per second."""
        return self.requests / self.duration_s

    @property
    def megabytes_per_s(self) -> float:
        """Response bytes read plus request body bytes sent, in 10^6 bytes/s."""
        return (self.response_bytes + self.request_body_bytes) / self.duration_s / 1e6


def write_script(path: Path, request_lua: str) -> Path:
    """Write a wrk script made of `request_lua` and the JSON `done` hook."""
    path.write_text(request_lua + "\n" + _DONE_HOOK)
    return path


def parse_output(stdout: str, request_body_bytes: int) -> WrkResult:
    """Parse the JSON line printed by the `done` hook."""
    for line in stdout.splitlines():
        if line.startswith(_MARKER):
            data = json.loads(line[len(_MARKER) :])
            break
    else:
        raise BenchError(f"wrk printed no result line:\n{stdout[-2000:]}")
    errors = sum(
        int(data[key])
        for key in (
            "connect_errors",
            "read_errors",
            "write_errors",
            "status_errors",
            "timeouts",
        )
    )
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        response_bytes=int(data["bytes"]),
        request_body_bytes=int(data["requests"]) * request_body_bytes,
        errors=errors,
        p50_us=float(data["p50_us"]),
        p99_us=float(data["p99_us"]),
        mean_us=float(data["mean_us"]),
    )


def wrk_binary() -> str | None:
    """Return the path of wrk, or None when it is not installed."""
    return shutil.which("wrk")


def run_wrk(
    url: str,
    *,
    script: Path,
    connections: int,
    duration_s: int,
    headers: tuple[str, ...] = (),
    request_body_bytes: int = 0,
    cpu: int | None = None,
    on_progress: Callable[[], None] | None = None,
) -> WrkResult:
    """Run one bounded wrk load (one thread) and return its result.

    `on_progress`, when given, is called three times while the load runs,
    at a quarter, half and three quarters of the duration.
    """
    binary = wrk_binary()
    if binary is None:
        raise BenchError("wrk is not installed")
    command = [
        binary,
        "-t1",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout", "10s",
        "--latency",
        "-s", str(script),
    ]  # fmt: skip
    for header in headers:
        command += ["-H", header]
    command.append(url)
    process = subprocess.Popen(
        pinned(command, cpu),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if on_progress is not None:
            for _ in range(_PROBES):
                time.sleep(duration_s / (_PROBES + 1))
                on_progress()
        stdout, stderr = process.communicate(timeout=duration_s + 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise BenchError(f"wrk exited with code {process.returncode}:\n{stderr}")
    return parse_output(stdout, request_body_bytes)
