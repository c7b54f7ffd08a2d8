"""Write the benchmark results as docs/benchmarks.md.

The harness generates the whole page except the sections named in
KEPT_SECTIONS, which are written by hand. When the page is rewritten, those
sections are copied over unchanged and placed after the generated ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.ceiling import SETUP_NOTE, render_stack_ceiling
from harness.idle import IdleResult
from harness.measure import BARE, JSON_LOG_SCENARIO, PGPROXY, PGPROXY_JSON_LOG
from harness.scenarios import SCENARIOS
from harness.summary import MIB, Row, TargetCheck, find, workers_medians
from harness.workers import WorkersOutcome

KEPT_SECTIONS = ("Config and routing", "Profile")

RESULT_COLUMNS = (
    "scenario", "target", "req/s", "req/s min-max", "p50 ms", "p99 ms", "MB/s",
    "peak RSS MiB", "CPU µs/req", "req/s / nginx", "p99 / nginx", "MB/s / nginx",
    "errors", "other load %",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Report:
    """Everything one invocation measured, ready to render."""

    command: str
    machine: dict[str, str]
    proxy_core: int | None
    load_core: int | None
    runs: int
    duration_s: int
    warmup_s: int
    quiet_wait_s: float
    rows: Sequence[Row]
    failures: dict[tuple[str, str], str]
    skipped: dict[tuple[str, str], str]
    checks: Sequence[TargetCheck]
    idle: Sequence[IdleResult]
    idle_skipped: str | None
    workers: WorkersOutcome | None
    hash_note: str | None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(value: float, reference: float | None) -> str:
    if reference is None or reference == 0:
        return "-"
    return f"{value / reference:.2f}"


def _result_cells(row: Row, nginx: Row | None) -> list[str]:
    rss = "-" if row.peak_rss_mib is None else f"{row.peak_rss_mib:.1f}"
    cpu = "-" if row.cpu_us_per_request is None else f"{row.cpu_us_per_request:.1f}"
    other = "-"
    if row.other_proxy_core_pct is not None and row.other_load_core_pct is not None:
        other = f"{row.other_proxy_core_pct:.0f} / {row.other_load_core_pct:.0f}"
    return [
        row.scenario,
        row.target,
        f"{row.requests_per_s:,.0f}",
        f"{row.requests_per_s_min:,.0f}-{row.requests_per_s_max:,.0f}",
        f"{row.p50_ms:.2f}",
        f"{row.p99_ms:.2f}",
        f"{row.megabytes_per_s:,.1f}",
        rss,
        cpu,
        _ratio(row.requests_per_s, nginx.requests_per_s if nginx else None),
        _ratio(row.p99_ms, nginx.p99_ms if nginx else None),
        _ratio(row.megabytes_per_s, nginx.megabytes_per_s if nginx else None),
        str(row.errors),
        other,
    ]


def results_table(rows: Sequence[Row]) -> str:
    """Render one line per scenario and target, with ratios to nginx."""
    cells = []
    for row in rows:
        nginx = find(rows, row.scenario, "nginx") if row.target != "direct" else None
        cells.append(_result_cells(row, nginx))
    return _table(RESULT_COLUMNS, cells)


def _scenarios_table() -> str:
    rows = [[f"`{s.name}`", s.title, f"`{s.load()}`"] for s in SCENARIOS]
    return _table(("scenario", "what", "load"), rows)


def _pinning(report: Report) -> str:
    if report.proxy_core is None:
        return "Processes are not pinned, because fewer than 2 cores are usable."
    return (
        f"The proxy under test is pinned to core {report.proxy_core} "
        f"(`taskset -c {report.proxy_core}`); wrk (one thread) and the upstream "
        f"are pinned to core {report.load_core}."
    )


def _setup(report: Report) -> str:
    machine = _table(("", ""), [[key, value] for key, value in report.machine.items()])
    measured = {row.target for row in report.rows}
    bare = f"\n{SETUP_NOTE}" if BARE in measured else ""
    return f"""## Setup

Command: `{report.command}`

{machine}

- {_pinning(report)} Every server listens on 127.0.0.1.
- Upstream: nginx with one worker serving fixed bodies: 100 bytes from
  `return 200`, 16 KiB and 1 MiB static files, and a POST location that reads
  the whole 1 MiB body before it responds (checked after each upload run from
  the upstream's log of request lengths). Three more server blocks form the
  consistent-hash cluster.
- nginx proxy: one worker, `upstream {{ keepalive 128; }}`,
  `proxy_http_version 1.1`, `proxy_set_header Connection ""`, the same header
  work as pgproxy (Host passed through, X-Forwarded-For and X-Forwarded-Proto
  set), request bodies streamed (`proxy_request_buffering off`), no access
  log; the hash cluster uses `hash $arg_k consistent`. Body buffers are
  raised from the 4 KiB/8 KiB defaults to 256 KiB (`client_body_buffer_size`,
  `proxy_buffer_size`, `proxy_buffers 8 256k`). With the defaults, nginx
  moved 1 MiB bodies 35-60 % slower in a check on a 2-core AMD EPYC virtual
  machine (4 s runs: 1,106 against 1,820 responses/s, 1,228 against 3,093
  uploads/s), so pgproxy is compared with the faster setting.
- pgproxy: `[server] workers = 1` and `access_log = "off"` in every
  throughput row; the `{PGPROXY_JSON_LOG}` row repeats `{JSON_LOG_SCENARIO}`
  with `access_log = "json"` written to a file, to show what the access log
  costs. Pools keep up to 128 idle connections per endpoint
  (`max_idle_connections = 128`); the hash cluster uses
  `balancer = "consistent_hash"` and `hash_key = "query:k"`.{bare}
- Each target is started fresh for every run and warmed up for
  {report.warmup_s} s with the same load. The harness then waits up to
  {report.quiet_wait_s:.0f} s for both cores to drop below 15 % busy and
  measures for {report.duration_s} s. Rows are medians of {report.runs}
  run(s), and nginx and pgproxy alternate which one goes first.
- Latency percentiles come from wrk's own histogram. MB/s counts response
  bytes read (headers included) plus request body bytes sent, in 10^6 bytes
  per second. Peak RSS is VmHWM summed over the proxy's processes (nginx:
  master and worker). CPU µs/req is the proxy's user plus system CPU time
  (from /proc/PID/stat) per completed request; unlike req/s it does not
  depend on whether the load core keeps up. Errors are wrk's socket errors,
  timeouts and non-2xx responses.
- "other load %" is the CPU time that programs other than the benchmark's
  own used during the run, on the proxy core / on the load core, in percent
  of one core. The machine may be shared, so a high value marks a disturbed
  run.

{_scenarios_table()}
"""


def _results(report: Report) -> str:
    parts = ["## Results", "", results_table(report.rows)]
    notes = [
        f"- {row.scenario} / {row.target}: {note}"
        for row in report.rows
        for note in row.notes
    ]
    if report.hash_note:
        notes.append(f"- hash-3: {report.hash_note}")
    notes += [
        f"- {scenario} / {target} failed: {_first_and_last_line(message)}"
        for (scenario, target), message in report.failures.items()
    ]
    notes += [
        f"- {scenario} / {target}: not measured, because {reason}."
        for (scenario, target), reason in report.skipped.items()
    ]
    if notes:
        parts += ["", *notes]
    return "\n".join(parts) + "\n"


def _first_and_last_line(message: str) -> str:
    """Shorten a multi-line error (a message, then a log tail) to two lines."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} ... {lines[-1]}"


def _targets(report: Report) -> str:
    verdicts = {None: "not measured", True: "met", False: "**not met**"}
    rows = [[c.name, c.bar, c.measured, verdicts[c.met]] for c in report.checks]
    return f"""## Targets

{_table(("target", "bar", "measured", "status"), rows)}
{_load_core_note(report)}"""


def _load_core_note(report: Report) -> str:
    nginx = find(report.rows, "keepalive-100b", "nginx")
    pgproxy = find(report.rows, "keepalive-100b", PGPROXY)
    if nginx is None or pgproxy is None:
        return ""
    if nginx.load_core_ours_pct is None or pgproxy.load_core_ours_pct is None:
        return ""
    note = (
        f"\nwrk and the upstream kept the load core {nginx.load_core_ours_pct:.0f} % "
        f"busy during the nginx runs of `keepalive-100b` and "
        f"{pgproxy.load_core_ours_pct:.0f} % during the pgproxy runs."
    )
    if nginx.load_core_ours_pct >= 90 > pgproxy.load_core_ours_pct:
        note += (
            " A saturated load core adds scheduler waits to the latencies wrk "
            "measures, so the p99 ratio favours the slower proxy."
        )
    return note + "\n"


def _access_log(report: Report) -> str:
    off = find(report.rows, JSON_LOG_SCENARIO, PGPROXY)
    json_log = find(report.rows, JSON_LOG_SCENARIO, PGPROXY_JSON_LOG)
    if off is None or json_log is None:
        return ""
    ratio = json_log.requests_per_s / off.requests_per_s
    return (
        "## Access log cost\n\n"
        f'On `{JSON_LOG_SCENARIO}`, pgproxy with `access_log = "json"` (written to '
        f"a file) served {json_log.requests_per_s:,.0f} req/s against "
        f"{off.requests_per_s:,.0f} with the log off ({ratio:.0%}), "
        f"with p99 {json_log.p99_ms:.2f} ms against {off.p99_ms:.2f} ms.\n"
    )


def _idle(report: Report) -> str:
    if report.idle_skipped:
        return f"## Memory with 1,000 idle connections\n\n{report.idle_skipped}\n"
    if not report.idle:
        return ""
    rows = [
        [
            result.target,
            str(result.processes),
            f"{result.rss_before_kib / MIB:.1f}",
            f"{result.rss_idle_kib / MIB:.1f}",
            f"{result.per_connection_kib:.1f}",
            f"{result.hwm_total_kib / MIB:.1f}",
            f"{result.hwm_max_kib / MIB:.1f}",
        ]
        for result in report.idle
    ]
    header = (
        "target", "processes", "RSS before MiB", "RSS idle MiB",
        "KiB per connection", "peak RSS MiB (sum)", "peak RSS MiB (largest process)",
    )  # fmt: skip
    return f"""## Memory with 1,000 idle connections

Each of {report.idle[0].connections:,} connections sends one GET (in batches
of 50), reads the response and stays open; memory is read one second later,
with all of them still open. RSS and VmHWM are summed over the proxy's
processes; the target applies to the largest single process.

{_table(header, rows)}
"""


_SPARE_CORES = """On a machine with spare cores (workers on cores of their own, wrk and
the upstream elsewhere), req/s is expected to grow nearly linearly with the
number of workers until the upstream or the load generator saturates. The
reason is that worker processes share nothing on the request path: each has
its own event loop, connections and pools, and the kernel spreads new
connections over their listening sockets. This machine has 2 cores, and wrk
plus the upstream fill the second one. Both workers therefore share one core
here and total req/s cannot grow, so this run checks only that connections
spread evenly and that a second worker does not cost CPU per request."""


def _workers(report: Report) -> str:
    outcome = report.workers
    if outcome is None:
        return ""
    if outcome.skipped or not outcome.runs:
        return f"## Workers\n\nskipped: {outcome.skipped}\n\n{_SPARE_CORES}\n"
    medians = workers_medians(outcome)
    rows = []
    for count, (rate, per_cpu) in medians.items():
        shares = [run.connection_shares for run in outcome.runs if run.workers == count]
        spread = "; ".join(", ".join(f"{s:.0%}" for s in run) for run in shares)
        rows.append([str(count), f"{rate:,.0f}", f"{per_cpu:,.0f}", spread])
    table = _table(
        (
            "workers",
            "req/s",
            "req per proxy CPU-second",
            "connection share per worker, each run",
        ),
        rows,
    )
    return f"""## Workers

`keepalive-100b` with `[server] workers = 1` and `= 2`, both pinned to the proxy core,
medians of {report.runs} run(s).
CPU time is utime plus stime of every pgproxy process, from /proc/PID/stat.
Connection shares count the established sockets on the listener's port held
by each worker, sampled three times during each run.

{table}

{_SPARE_CORES}
"""


def render(report: Report) -> str:
    """Render the generated part of the page."""
    sections = [
        _TITLE,
        _HOW_TO_RUN,
        _setup(report),
        _results(report),
        _targets(report),
        render_stack_ceiling(report.rows),
        _access_log(report),
        _idle(report),
        _workers(report),
    ]
    return "\n".join(section.rstrip("\n") + "\n" for section in sections if section)


_TITLE = """# Benchmarks

pgproxy against nginx on the same machine, measured by one run of
`bench/run.py`; the sections below say exactly how.
"""

_HOW_TO_RUN = """## How to run

```
python bench/run.py                      # every scenario, 3 runs of 10 s each
python bench/run.py --quick              # about 1 s per target, one run
python bench/run.py --scenarios keepalive-100b hash-3 --runs 5 --duration 20
python bench/run.py --targets direct nginx pgproxy bare  # adds the bare proxy
```

Linux only (it reads /proc). When nginx or wrk is missing and the harness
runs as root on a Debian-like system, it installs `nginx-light` and `wrk`
with apt-get; otherwise it prints the command to run. Every process it starts
listens on 127.0.0.1, lives in a temporary directory and is stopped by pid.
A full run (every scenario, at least the default targets, at least 3 runs,
no `--quick`) rewrites this page; any other run writes
`bench/results/benchmarks.md` unless `--out` names a file. The raw samples
go to `bench/results/` as JSON.
"""


def _sections(text: str) -> list[tuple[str, str]]:
    """Split markdown into (heading, text) pairs at `## ` headings."""
    sections: list[tuple[str, str]] = []
    heading, lines = "", list[str]()
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            sections.append((heading, "".join(lines)))
            heading, lines = line[3:].strip(), []
        lines.append(line)
    sections.append((heading, "".join(lines)))
    return sections


def merge(existing: str, generated: str) -> str:
    """Append the kept hand-written sections of `existing` to `generated`."""
    kept = [
        body.rstrip("\n") + "\n"
        for heading, body in _sections(existing)
        if heading.startswith(KEPT_SECTIONS)
    ]
    return "\n".join([generated.rstrip("\n") + "\n", *kept])
