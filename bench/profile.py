"""Profile pgproxy under benchmark load with py-spy and list its hot functions.

    python bench/profile.py [--scenario NAME] [--duration S] [--out DIR]

Starts the benchmark's upstream and pgproxy (one worker, access log off,
both pinned like in `bench/run.py`), drives one scenario with wrk and
samples pgproxy with `py-spy record` meanwhile. Writes a flame graph
(profile.svg) and collapsed stacks (profile.txt) to DIR and prints the
functions with the most samples, by self time and by inclusive time.
py-spy is not a dependency of pgproxy: install it with `pip install py-spy`.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from harness import wrk
from harness.nginx import start_upstream
from harness.pgproxy import start_pgproxy
from harness.processes import BenchError
from harness.scenarios import SCENARIOS, by_name

logger = logging.getLogger("bench.profile")

SAMPLE_RATE_HZ = 250
TOP = 25


def _frame_function(frame: str) -> str:
    """Strip the line number from a py-spy frame `func (file.py:123)`."""
    name, _, location = frame.partition(" (")
    return f"{name} ({location.rsplit(':', 1)[0]})" if location else name


def hot_functions(
    collapsed: str,
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """Return (self, inclusive) sample counts per function, and the total."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        functions = [_frame_function(frame) for frame in stack.split(";")]
        own[functions[-1]] += count
        # Inclusive time is listed for pgproxy's own functions only, because
        # the frames above them (runpy, typer, anyio, asyncio) include everything.
        for function in {f for f in functions if "(pgproxy/" in f}:
            inclusive[function] += count
    return own.most_common(TOP), inclusive.most_common(TOP), total


def _record(pid: int, seconds: int, fmt: str, out: Path, native: bool) -> None:
    subprocess.run(
        [
            "py-spy", "record", "--pid", str(pid), "--duration", str(seconds),
            "--rate", str(SAMPLE_RATE_HZ), "--format", fmt, "--output", str(out),
            # py-spy can read C frames only while the process is paused.
            *(["--native"] if native else ["--nonblocking"]),
        ],
        check=True,
        capture_output=True,
        timeout=seconds + 60,
    )  # fmt: skip


def profile(
    scenario_name: str,
    access_log: str,
    native: bool,
    seconds: int,
    out_dir: Path,
    workdir: Path,
) -> str:
    """Load pgproxy with one scenario, sample it twice, return the collapsed stacks."""
    scenario = by_name(scenario_name)
    pinned = len(os.sched_getaffinity(0)) >= 2
    cores = sorted(os.sched_getaffinity(0))
    proxy_cpu, load_cpu = (cores[0], cores[1]) if pinned else (None, None)
    upstream = start_upstream(workdir, load_cpu)
    try:
        process, port = start_pgproxy(
            workdir, upstream, cpu=proxy_cpu, access_log=access_log
        )
        try:
            script = wrk.write_script(workdir / "profile.lua", scenario.request_lua)
            # One wrk run spans both recordings (flame graph, then collapsed
            # stacks), with a second of margin at each end.
            load = threading.Thread(
                target=wrk.run_wrk,
                args=(f"http://127.0.0.1:{port}{scenario.path}",),
                kwargs={
                    "script": script,
                    "connections": scenario.connections,
                    "duration_s": 2 * seconds + 3,
                    "headers": scenario.headers,
                    "cpu": load_cpu,
                },
            )
            load.start()
            load.join(1.0)
            svg, raw = out_dir / "profile.svg", out_dir / "profile.txt"
            _record(process.pid, seconds, "flamegraph", svg, native)
            _record(process.pid, seconds, "raw", raw, native)
            load.join()
        finally:
            process.stop()
    finally:
        upstream.process.stop()
    return (out_dir / "profile.txt").read_text()


def build_parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(prog="python bench/profile.py")
    parser.add_argument(
        "--scenario", default="keepalive-100b", choices=[s.name for s in SCENARIOS]
    )
    parser.add_argument(
        "--access-log", default="off", choices=["off", "json", "combined"]
    )
    parser.add_argument(
        "--native",
        action="store_true",
        help="include C frames (uvloop, httptools, the kernel calls they make)",
    )
    parser.add_argument(
        "--duration", type=int, default=10, help="seconds per recording"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser


def print_hot_functions(collapsed: str) -> None:
    """Print the functions with the most samples, by self and inclusive time."""
    own, inclusive, total = hot_functions(collapsed)
    # Entry points (the CLI, the event loop runner) include nearly every sample.
    inclusive = [(name, count) for name, count in inclusive if count < 0.9 * total]
    for title, counts in (("self", own), ("inclusive (pgproxy functions)", inclusive)):
        print(f"\ntop functions by {title} samples ({total} samples in all)")
        for function, count in counts:
            print(f"{100 * count / total:5.1f} %  {function}")


def main(argv: list[str]) -> int:
    """Run the profile and print the hot functions; return the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if shutil.which("py-spy") is None:
        logger.error("py-spy is not installed: run `pip install py-spy` and retry")
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pgproxy-profile-"))
    workdir.chmod(0o755)
    try:
        collapsed = profile(
            args.scenario,
            args.access_log,
            args.native,
            args.duration,
            args.out,
            workdir,
        )
    except (BenchError, subprocess.SubprocessError) as error:
        logger.error("profile failed: %s", error)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_hot_functions(collapsed)
    print(f"\nwrote {args.out / 'profile.svg'} and {args.out / 'profile.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
