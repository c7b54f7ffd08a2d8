"""Compare pgproxy with one and two worker processes on the same core.

Both configurations run pinned to the proxy core, because on a 2-core
machine the load generator and the upstream fill the other one. What this
can show is how evenly connections spread over the workers and whether
requests per second of proxy CPU time hold up with a second worker.
Connections per worker are counted from /proc: established sockets on the
listener's port held by each process.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from harness import procfs, wrk
from harness.measure import RETRY_PAUSE_S, Session
from harness.pgproxy import start_pgproxy
from harness.processes import BenchError, Process
from harness.scenarios import Scenario

logger = logging.getLogger(__name__)

WORKER_COUNTS = (1, 2)


@dataclass(frozen=True, slots=True)
class WorkersRun:
    """One load run of pgproxy with a given number of workers."""

    workers: int
    run: int
    requests_per_s: float
    requests: int
    proxy_cpu_s: float
    connection_shares: tuple[float, ...]

    @property
    def requests_per_cpu_s(self) -> float:
        """Completed requests per second of CPU time used by all pgproxy processes."""
        return self.requests / self.proxy_cpu_s if self.proxy_cpu_s else 0.0


@dataclass(slots=True)
class WorkersOutcome:
    """The runs taken, or why the comparison was skipped."""

    runs: list[WorkersRun] = field(default_factory=list)
    skipped: str | None = None


def serving_processes(process: Process, port: int) -> list[int]:
    """Return the processes that accept connections on `port`.

    A supervisor with an open listening socket is not counted when its
    children listen too, because the children serve the connections.
    """
    listening = procfs.listening_processes(process.pid, port)
    children = [pid for pid in listening if pid != process.pid]
    return children or listening


def _wait_for_workers(process: Process, port: int, workers: int) -> list[int]:
    deadline = time.monotonic() + 10.0
    serving = serving_processes(process, port)
    while len(serving) < workers and time.monotonic() < deadline:
        time.sleep(0.2)
        serving = serving_processes(process, port)
    return serving


def _shares(samples: list[dict[int, int]], pids: list[int]) -> tuple[float, ...]:
    """Average each process's share of the established connections."""
    shares = []
    for pid in pids:
        values = [
            sample[pid] / total
            for sample in samples
            if (total := sum(sample.values())) > 0
        ]
        shares.append(statistics.fmean(values) if values else 0.0)
    return tuple(shares)


def _run_once(
    session: Session, scenario: Scenario, script: str, workers: int, run: int
) -> WorkersRun | str:
    process, port = start_pgproxy(
        session.workdir, session.upstream, cpu=session.proxy_cpu,
        workers=workers, name=f"pgproxy-workers-{workers}",
    )  # fmt: skip
    try:
        serving = _wait_for_workers(process, port, workers)
        if len(serving) < workers:
            return (
                f"with workers = {workers} pgproxy has {len(serving)} process(es) "
                "accepting connections"
            )
        url = f"http://127.0.0.1:{port}{scenario.path}"

        def load(seconds: int, probe: Callable[[], None] | None) -> wrk.WrkResult:
            return wrk.run_wrk(
                url,
                script=session.workdir / script,
                connections=scenario.connections,
                duration_s=seconds,
                cpu=session.load_cpu,
                on_progress=probe,
            )

        if session.warmup_s:
            load(session.warmup_s, None)
        samples: list[dict[int, int]] = []
        cpu_before = procfs.tree_cpu_seconds(process.pid)
        result = load(
            session.duration_s,
            lambda: samples.append(procfs.established_per_process(serving, port)),
        )
        cpu_after = procfs.tree_cpu_seconds(process.pid)
    finally:
        process.stop()
    return WorkersRun(
        workers=workers,
        run=run,
        requests_per_s=result.requests_per_s,
        requests=result.requests,
        proxy_cpu_s=sum(cpu_after.values()) - sum(cpu_before.values()),
        connection_shares=_shares(samples, serving),
    )


def _run_with_retry(
    session: Session, scenario: Scenario, script: str, workers: int, run: int
) -> WorkersRun | str:
    for attempt in range(2):
        try:
            return _run_once(session, scenario, script, workers, run)
        except BenchError as error:
            failure = f"pgproxy with workers = {workers} failed to start: {error}"
        if attempt == 0:
            logger.warning("%s; retrying in %d s", failure, RETRY_PAUSE_S)
            time.sleep(RETRY_PAUSE_S)
    return failure


def measure_workers(session: Session, scenario: Scenario, runs: int) -> WorkersOutcome:
    """Measure 1 and 2 workers `runs` times each, alternating which goes first."""
    script = f"{scenario.name}.lua"
    wrk.write_script(session.workdir / script, scenario.request_lua)
    outcome = WorkersOutcome()
    for run in range(runs):
        order = WORKER_COUNTS if run % 2 == 0 else WORKER_COUNTS[::-1]
        for workers in order:
            measured = _run_with_retry(session, scenario, script, workers, run)
            if isinstance(measured, str):
                reason = "workers not implemented" if workers > 1 else "pgproxy failed"
                outcome.skipped = f"{reason} ({measured})"
                logger.warning("skipped: %s", outcome.skipped)
                return outcome
            logger.info(
                "workers=%d run %d: %.0f req/s, %.0f req per CPU-second, shares %s",
                measured.workers, run + 1, measured.requests_per_s,
                measured.requests_per_cpu_s,
                ", ".join(f"{share:.0%}" for share in measured.connection_shares),
            )  # fmt: skip
            outcome.runs.append(measured)
    return outcome
