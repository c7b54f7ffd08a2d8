"""Helpers for end-to-end tests of the admin listener, reloads and workers.

`admin_port` reads the admin listener's port from pgproxy's log, and `get`
sends one request with http.client. `samples` scrapes /metrics and parses it
with prometheus-client's parser. `KeepAliveLoad` runs a bounded, paced load
of keep-alive GETs from a few threads and records every response.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

from e2e_process import PgproxyProcess
from prometheus_client.parser import text_string_to_metric_families

_ADMIN_RE = re.compile(r"admin listener listening on \S+:(\d+)")

Sample = tuple[str, tuple[tuple[str, str], ...]]


def admin_port(process: PgproxyProcess) -> int:
    """Return the admin listener's port from the log; fail if it was not logged."""
    line = process.wait_for_stderr("admin listener listening on", timeout=5.0)
    assert line is not None, f"no admin listener line; stderr:\n{process.stderr_text()}"
    match = _ADMIN_RE.search(line)
    assert match is not None, line
    return int(match.group(1))


def get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """Send one GET to 127.0.0.1:port; return status, body and headers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, body, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def status_json(port: int) -> dict[str, Any]:
    """Return the parsed /status document."""
    status, body, _ = get(port, "/status")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def samples(port: int) -> dict[Sample, float]:
    """Scrape /metrics and return every sample keyed by name and sorted labels."""
    status, body, headers = get(port, "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    result = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            result[key] = sample.value
    return result


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    """Build a sample's label key from keyword arguments."""
    return tuple(sorted(values.items()))


@dataclass
class Outcome:
    """One request of a load run: when it ran and what came back."""

    started: float
    ended: float
    status: int | None
    upstream: str | None
    error: str | None = None


class KeepAliveLoad:
    """Paced keep-alive GETs from `threads` threads, bounded in time and count."""

    def __init__(
        self, port: int, path: str, *, threads: int, rate_per_thread: float
    ) -> None:
        self.port = port
        self.path = path
        self.threads = threads
        self.interval = 1.0 / rate_per_thread
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self, seconds: float, max_requests: int) -> None:
        """Start the threads; each stops after `seconds` or its share of requests."""
        deadline = time.monotonic() + seconds
        share = max_requests // self.threads
        for index in range(self.threads):
            thread = threading.Thread(
                target=self._run, args=(deadline, share), name=f"load-{index}"
            )
            thread.start()
            self._workers.append(thread)

    def join(self, timeout: float = 30.0) -> list[Outcome]:
        """Wait for the threads; return every outcome, sorted by start time."""
        for thread in self._workers:
            thread.join(timeout)
        self._stop.set()
        return sorted(self.outcomes, key=lambda outcome: outcome.started)

    def _run(self, deadline: float, count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        next_at = time.monotonic()
        for _ in range(count):
            now = time.monotonic()
            if now >= deadline or self._stop.is_set():
                break
            if next_at > now:
                time.sleep(next_at - now)
            next_at += self.interval
            outcome = self._one(conn)
            with self._lock:
                self.outcomes.append(outcome)
            if outcome.error is not None:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def _one(self, conn: http.client.HTTPConnection) -> Outcome:
        started = time.monotonic()
        try:
            conn.request("GET", self.path)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as error:
            return Outcome(started, time.monotonic(), None, None, repr(error))
        upstream = response.getheader("X-Upstream")
        return Outcome(started, time.monotonic(), response.status, upstream)
