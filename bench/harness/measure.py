"""Measure every target on every scenario, runs interleaved.

For each scenario and run, each target is started fresh (so its peak RSS
belongs to that scenario), warmed up, loaded with wrk, read from /proc and
stopped. The proxies (nginx, pgproxy and, when selected, bare) run in reverse
order on every other run, so slow drift on a shared machine spreads over all
of them instead of favouring one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import procfs, wrk
from harness.bare import UNSUPPORTED_SCENARIOS, start_bare
from harness.cpuload import LoadAccounting, OtherLoad, wait_for_quiet
from harness.nginx import LARGE_BODY_BYTES, Upstream, start_proxy
from harness.pgproxy import start_pgproxy
from harness.processes import BenchError, Process
from harness.scenarios import Scenario

logger = logging.getLogger(__name__)

DIRECT = "direct"
NGINX = "nginx"
PGPROXY = "pgproxy"
PGPROXY_JSON_LOG = "pgproxy-json-log"
BARE = "bare"
# The default targets; bare is measured only when selected, because it adds
# a quarter to the length of a full run.
TARGETS = (DIRECT, NGINX, PGPROXY)
SELECTABLE_TARGETS = (*TARGETS, BARE)
PROXIES = (NGINX, PGPROXY, BARE)
RETRY_PAUSE_S = 5
# The access-log cost is measured on this scenario only.
JSON_LOG_SCENARIO = "keepalive-100b"


@dataclass(frozen=True, slots=True)
class Session:
    """State shared by every measurement: directories, upstream, cores, timing."""

    workdir: Path
    upstream: Upstream
    proxy_cpu: int | None
    load_cpu: int | None
    duration_s: int
    warmup_s: int
    quiet_wait_s: float


@dataclass(frozen=True, slots=True)
class Sample:
    """One wrk run of one target on one scenario."""

    scenario: str
    target: str
    run: int
    result: wrk.WrkResult
    memory: procfs.TreeMemory | None
    proxy_cpu_s: float | None
    other_load: OtherLoad | None
    note: str = ""


@dataclass(slots=True)
class Outcome:
    """Every sample taken, and the targets that failed, with the reason."""

    samples: list[Sample] = field(default_factory=list)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)


def targets_for(scenario: Scenario, selected: Sequence[str]) -> list[str]:
    """Return the targets measured on a scenario, in the order of `selected`."""
    skipped = skipped_targets(scenario, selected)
    names = [name for name in selected if name not in skipped]
    if scenario.name == JSON_LOG_SCENARIO and PGPROXY in names:
        names.append(PGPROXY_JSON_LOG)
    return names


def skipped_targets(scenario: Scenario, selected: Sequence[str]) -> dict[str, str]:
    """Return the selected targets that cannot serve `scenario`, with the reason."""
    if BARE in selected and scenario.name in UNSUPPORTED_SCENARIOS:
        return {BARE: UNSUPPORTED_SCENARIOS[scenario.name]}
    return {}


def interleaved(targets: list[str], run: int) -> list[str]:
    """Reverse the order of the proxies on odd runs, keeping other targets in place."""
    if run % 2 == 0:
        return targets
    slots = [index for index, name in enumerate(targets) if name in PROXIES]
    reordered = list(targets)
    for slot, name in zip(slots, reversed([targets[i] for i in slots]), strict=True):
        reordered[slot] = name
    return reordered


def _start(
    session: Session, target: str, scenario: Scenario
) -> tuple[Process | None, int]:
    upstream = session.upstream
    if target == DIRECT:
        return None, upstream.ring_ports[0] if scenario.uses_ring else upstream.port
    if target == NGINX:
        return start_proxy(session.workdir, upstream, session.proxy_cpu)
    if target == BARE:
        return start_bare(session.workdir, upstream, cpu=session.proxy_cpu)
    access_log = "json" if target == PGPROXY_JSON_LOG else "off"
    return start_pgproxy(
        session.workdir, upstream, cpu=session.proxy_cpu, access_log=access_log,
        name=target,
    )  # fmt: skip


def _script(session: Session, scenario: Scenario) -> Path:
    path = session.workdir / f"{scenario.name}.lua"
    if not path.exists():
        wrk.write_script(path, scenario.request_lua)
    return path


def _load(
    session: Session, scenario: Scenario, port: int, seconds: int
) -> wrk.WrkResult:
    return wrk.run_wrk(
        f"http://127.0.0.1:{port}{scenario.path}",
        script=_script(session, scenario),
        connections=scenario.connections,
        duration_s=seconds,
        headers=scenario.headers,
        request_body_bytes=scenario.request_body_bytes,
        cpu=session.load_cpu,
    )


def _accounting(session: Session, process: Process | None) -> LoadAccounting | None:
    if session.proxy_cpu is None or session.load_cpu is None:
        return None
    return LoadAccounting(
        session.proxy_cpu,
        session.load_cpu,
        process.pid if process else None,
        session.upstream.process.pid,
    )


def _wait_for_quiet(session: Session) -> None:
    if session.proxy_cpu is None or session.load_cpu is None:
        return
    if session.quiet_wait_s:
        cores = (session.proxy_cpu, session.load_cpu)
        wait_for_quiet(cores, session.quiet_wait_s)


def measure(session: Session, scenario: Scenario, target: str, run: int) -> Sample:
    """Start `target`, load it with `scenario`, read /proc, stop it."""
    process, port = _start(session, target, scenario)
    try:
        if session.warmup_s:
            _load(session, scenario, port, session.warmup_s)
        _wait_for_quiet(session)
        uploads_before = count_uploads(session.upstream)
        accounting = _accounting(session, process)
        if accounting:
            accounting.start()
        result = _load(session, scenario, port, session.duration_s)
        proxy_cpu_s, other = (
            accounting.stop(result.duration_s) if accounting else (None, None)
        )
        memory = process.tree_memory() if process else None
    finally:
        exit_code = process.stop() if process else 0
    note = _upload_note(session, scenario, uploads_before, result)
    if exit_code != 0:
        note += f" {target} exited with code {exit_code} on SIGTERM."
    return Sample(
        scenario.name, target, run, result, memory,
        proxy_cpu_s if process else None, other, note.strip(),
    )  # fmt: skip


def count_uploads(upstream: Upstream) -> tuple[int, int]:
    """Count (complete, short) request bodies in the upstream's upload log."""
    complete = short = 0
    path = upstream.upload_log()
    if not path.exists():
        return 0, 0
    for line in path.read_text().splitlines():
        length, status = line.split()
        if int(length) >= LARGE_BODY_BYTES and status == "200":
            complete += 1
        else:
            short += 1
    return complete, short


def _upload_note(
    session: Session,
    scenario: Scenario,
    before: tuple[int, int],
    result: wrk.WrkResult,
) -> str:
    if not scenario.request_body_bytes:
        return ""
    complete, short = count_uploads(session.upstream)
    complete -= before[0]
    short -= before[1]
    # The upstream may finish a few requests whose responses wrk stopped
    # waiting for at the end of the run, so it may count more than wrk.
    if short or complete < result.requests:
        return (
            f"upstream read {complete} complete and {short} short bodies "
            f"for {result.requests} requests."
        )
    return ""


def measure_with_retry(
    session: Session, scenario: Scenario, target: str, run: int
) -> Sample:
    """Measure once, and once more after a pause if the first attempt failed.

    A target may fail to start for a passing reason, such as a source tree
    caught in the middle of an edit; a second failure is final.
    """
    try:
        return measure(session, scenario, target, run)
    except BenchError as error:
        logger.warning(
            "%s on %s failed, retrying in %d s: %s",
            target, scenario.name, RETRY_PAUSE_S, error,
        )  # fmt: skip
    time.sleep(RETRY_PAUSE_S)
    return measure(session, scenario, target, run)


def run_scenarios(
    session: Session,
    scenarios: Sequence[Scenario],
    targets: Sequence[str],
    runs: int,
) -> Outcome:
    """Measure each scenario `runs` times on each target, interleaved.

    A target that fails twice in a row is not measured again on that
    scenario, and the failure is recorded in the outcome. So is a target
    that cannot serve a scenario, which is never started for it.
    """
    outcome = Outcome()
    for scenario in scenarios:
        for target, reason in skipped_targets(scenario, targets).items():
            outcome.skipped[(scenario.name, target)] = reason
        names = targets_for(scenario, targets)
        for run in range(runs):
            for target in interleaved(names, run):
                if (scenario.name, target) in outcome.failures:
                    continue
                try:
                    sample = measure_with_retry(session, scenario, target, run)
                except BenchError as error:
                    logger.error("%s on %s failed: %s", target, scenario.name, error)
                    outcome.failures[(scenario.name, target)] = str(error)
                    continue
                logger.info(
                    "%-15s %-17s run %d: %8.0f req/s  p99 %6.2f ms  errors %d",
                    scenario.name, target, run + 1, sample.result.requests_per_s,
                    sample.result.p99_us / 1000, sample.result.errors,
                )  # fmt: skip
                outcome.samples.append(sample)
    return outcome
