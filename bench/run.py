"""Benchmark pgproxy against nginx and write the results as a markdown page.

    python bench/run.py [--quick] [--runs N] [--duration S]
                        [--scenarios NAME ...] [--targets NAME ...] [--out FILE]

One invocation starts an upstream nginx, then measures, one after another,
the upstream directly, nginx as a reverse proxy and pgproxy, on every
selected scenario. With `--targets direct nginx pgproxy bare` it also
measures bench/bare_proxy.py, a minimal proxy on pgproxy's own stack
(uvloop, httptools, asyncio Protocols). The proxy runs on one core, wrk and
the upstream on another. A full run rewrites docs/benchmarks.md, any other
run writes bench/results/benchmarks.md unless --out is given. Exit code 0
when every selected target was measured, 1 when a target failed, 2 when
the tools are missing or the arguments are invalid.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness import hashcheck, idle, machine, measure, report, summary, workers
from harness.nginx import start_proxy, start_upstream
from harness.pgproxy import start_pgproxy
from harness.processes import BenchError, Process
from harness.scenarios import SCENARIOS, by_name, scenario_names

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = ROOT / "bench" / "results"
PARTIAL_OUT = RESULTS_DIR / "benchmarks.md"
IDLE_CONNECTIONS = 1000


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser; defaults that depend on --quick are None."""
    parser = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.split("\n\n")[2]
    )
    parser.add_argument(
        "--quick", action="store_true", help="one 1 s run per target, no warm-up"
    )
    parser.add_argument("--runs", type=int, help="runs per target (default 3)")
    parser.add_argument(
        "--duration", type=int, help="seconds of load per run (default 10)"
    )
    parser.add_argument(
        "--warmup", type=int, help="seconds of warm-up load before each run (default 1)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait, before each run, for both cores to drop below "
        "15 %% busy (default 15; 0 with --quick)",
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=scenario_names(),
        default=scenario_names(),
        metavar="NAME",
        help=f"scenarios to run (default all): {', '.join(scenario_names())}",
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=measure.SELECTABLE_TARGETS,
        default=list(measure.TARGETS),
        help=f"targets to measure (default: {' '.join(measure.TARGETS)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="markdown file to write (default docs/benchmarks.md for a full run, "
        "bench/results/benchmarks.md for a partial or --quick one)",
    )
    parser.add_argument(
        "--keep-temp", action="store_true", help="keep the temporary directory"
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; --quick sets one 1-second run without warm-up."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        defaults = {"runs": 1, "duration": 1, "warmup": 0, "quiet_wait": 0.0}
    else:
        defaults = {"runs": 3, "duration": 10, "warmup": 1, "quiet_wait": 15.0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    if args.runs < 1 or args.duration < 1:
        parser.error("--runs and --duration must be at least 1")
    if args.warmup < 0 or args.quiet_wait < 0:
        parser.error("--warmup and --quiet-wait must be at least 0")
    args.command = shlex.join(["python", "bench/run.py", *argv])
    if args.out is None:
        args.out = DEFAULT_OUT if is_full_run(args) else PARTIAL_OUT
    return args


def is_full_run(args: argparse.Namespace) -> bool:
    """Return whether the run measures everything the published page needs.

    Only such a run replaces docs/benchmarks.md by default, so a quick check
    of one scenario cannot overwrite the published results.
    """
    return (
        not args.quick
        and args.runs >= 3
        and set(args.scenarios) == set(scenario_names())
        and set(args.targets) >= set(measure.TARGETS)
    )


def pick_cores() -> tuple[int | None, int | None]:
    """Return (proxy core, load core) and move the harness onto the load core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        logger.warning("fewer than 2 usable cores: processes are not pinned")
        return None, None
    os.sched_setaffinity(0, {cores[1]})
    return cores[0], cores[1]


def _idle_target(session: measure.Session, target: str) -> tuple[Process, int]:
    if target == measure.NGINX:
        return start_proxy(session.workdir, session.upstream, session.proxy_cpu)
    return start_pgproxy(
        session.workdir, session.upstream, cpu=session.proxy_cpu, name="pgproxy-idle"
    )


def measure_idle(
    session: measure.Session, targets: list[str]
) -> tuple[list[idle.IdleResult], str | None]:
    """Measure proxy memory with 1,000 idle connections on nginx and pgproxy."""
    results: list[idle.IdleResult] = []
    for target in (t for t in (measure.NGINX, measure.PGPROXY) if t in targets):
        try:
            process, port = _idle_target(session, target)
        except BenchError as error:
            return results, f"skipped: {target} failed to start: {error}"
        try:
            results.append(idle.measure_idle(target, process, port, IDLE_CONNECTIONS))
        except (BenchError, OSError) as error:
            return results, f"skipped: {target} failed the idle check: {error}"
        finally:
            process.stop()
        logger.info("idle-1000 %s: %s", target, results[-1])
    return results, None


def check_hash_agreement(session: measure.Session) -> str:
    """Compare the ring endpoints nginx and pgproxy pick; return a report line."""
    try:
        note = hashcheck.hash_agreement(session)
    except (BenchError, OSError) as error:
        note = f"hash agreement check failed: {error}"
    logger.info("hash-3: %s", note)
    return note


@dataclasses.dataclass(slots=True)
class Measurements:
    """Everything one invocation measured, before it is summarized."""

    outcome: measure.Outcome
    idle_results: list[idle.IdleResult] = dataclasses.field(default_factory=list)
    idle_skipped: str | None = None
    workers: workers.WorkersOutcome | None = None
    hash_note: str | None = None


def take_measurements(
    session: measure.Session, args: argparse.Namespace
) -> Measurements:
    """Run the selected scenarios, then the hash, idle and workers checks."""
    names = {scenario.name for scenario in SCENARIOS}
    selected = [by_name(name) for name in args.scenarios if name in names]
    outcome = measure.run_scenarios(session, selected, args.targets, args.runs)
    taken = Measurements(outcome)
    both_proxies = {measure.NGINX, measure.PGPROXY} <= set(args.targets)
    if "hash-3" in args.scenarios and both_proxies:
        taken.hash_note = check_hash_agreement(session)
    if "idle-1000" in args.scenarios:
        taken.idle_results, taken.idle_skipped = measure_idle(session, args.targets)
    if "workers" in args.scenarios and measure.PGPROXY in args.targets:
        taken.workers = workers.measure_workers(
            session, by_name("keepalive-100b"), args.runs
        )
    return taken


def dump_raw(path: Path, taken: Measurements) -> None:
    """Write every sample and check result as JSON, for later analysis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    outcome = taken.outcome
    payload = {
        "samples": [dataclasses.asdict(sample) for sample in outcome.samples],
        "idle": [dataclasses.asdict(result) for result in taken.idle_results],
        "workers": dataclasses.asdict(taken.workers) if taken.workers else None,
        "failures": {" / ".join(key): text for key, text in outcome.failures.items()},
        "skipped": {" / ".join(key): text for key, text in outcome.skipped.items()},
    }
    path.write_text(json.dumps(payload, indent=1, default=str))


def run(args: argparse.Namespace, workdir: Path) -> report.Report:
    """Start the upstream, take every measurement, and build the report."""
    # Described before measuring, so the commit is the one the run started on.
    described = machine.describe()
    proxy_cpu, load_cpu = pick_cores()
    upstream = start_upstream(workdir, load_cpu)
    session = measure.Session(
        workdir=workdir,
        upstream=upstream,
        proxy_cpu=proxy_cpu,
        load_cpu=load_cpu,
        duration_s=args.duration,
        warmup_s=args.warmup,
        quiet_wait_s=args.quiet_wait,
    )
    try:
        taken = take_measurements(session, args)
    finally:
        upstream.process.stop()

    raw_dir = RESULTS_DIR if args.out == DEFAULT_OUT else args.out.parent
    dump_raw(raw_dir / time.strftime("benchmark-%Y%m%d-%H%M%S.json"), taken)
    rows = summary.summarize(taken.outcome.samples)
    return report.Report(
        command=args.command,
        machine=described,
        proxy_core=proxy_cpu,
        load_core=load_cpu,
        runs=args.runs,
        duration_s=args.duration,
        warmup_s=args.warmup,
        quiet_wait_s=args.quiet_wait,
        rows=rows,
        failures=taken.outcome.failures,
        skipped=taken.outcome.skipped,
        checks=summary.check_targets(rows, taken.idle_results, taken.workers),
        idle=taken.idle_results,
        idle_skipped=taken.idle_skipped,
        workers=taken.workers,
        hash_note=taken.hash_note,
    )


def main(argv: list[str]) -> int:
    """Run the benchmark and write the report; return the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        machine.ensure_tools()
        idle.raise_fd_limit(IDLE_CONNECTIONS + 1024)
    except BenchError as error:
        logger.error("%s", error)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pgproxy-bench-"))
    # nginx workers drop root privileges and must still read the static files.
    workdir.chmod(0o755)
    try:
        result = run(args, workdir)
    except BenchError as error:
        logger.error("benchmark failed: %s", error)
        return 1
    finally:
        if args.keep_temp:
            logger.info("temporary files kept in %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    existing = args.out.read_text() if args.out.exists() else ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.merge(existing, report.render(result)))
    print(report.results_table(result.rows))
    print(f"\nwrote {args.out}")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
