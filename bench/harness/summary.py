"""Reduce samples to medians with their spread, and check the targets.

Each table row is the median over runs of one target on one scenario, with
the minimum and maximum req/s beside it so a disturbed run shows. Ratios
compare pgproxy to nginx measured in the same invocation.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from harness.idle import IdleResult
from harness.measure import BARE, NGINX, PGPROXY, Sample
from harness.workers import WorkersOutcome

MIB = 1024.0

# The bars pgproxy is measured against; the report states them as written here.
MIN_REQUESTS_RATIO = 0.70
MAX_P99_RATIO = 1.5
MIN_THROUGHPUT_RATIO = 0.70
SHARE_RANGE = (0.35, 0.65)
MIN_CPU_EFFICIENCY_RATIO = 0.90
MAX_IDLE_RSS_MIB = 40.0

P99_NAME = "1 worker, 100 B keep-alive: p99 latency"
P99_BAR = f"at most {MAX_P99_RATIO}x nginx's"


@dataclass(frozen=True, slots=True)
class Row:
    """Medians of one target on one scenario, with the req/s spread."""

    scenario: str
    target: str
    runs: int
    requests_per_s: float
    requests_per_s_min: float
    requests_per_s_max: float
    p50_ms: float
    p99_ms: float
    megabytes_per_s: float
    peak_rss_mib: float | None
    cpu_us_per_request: float | None
    errors: int
    other_proxy_core_pct: float | None
    other_load_core_pct: float | None
    load_core_ours_pct: float | None
    notes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TargetCheck:
    """One target: its bar, the measured value, and whether the bar is met."""

    name: str
    bar: str
    measured: str
    met: bool | None


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _row(group: list[Sample]) -> Row:
    rates = [sample.result.requests_per_s for sample in group]
    rss = [s.memory.hwm_total_kib / MIB for s in group if s.memory is not None]
    loads = [s.other_load for s in group if s.other_load is not None]
    return Row(
        scenario=group[0].scenario,
        target=group[0].target,
        runs=len(group),
        requests_per_s=statistics.median(rates),
        requests_per_s_min=min(rates),
        requests_per_s_max=max(rates),
        p50_ms=statistics.median(s.result.p50_us for s in group) / 1000,
        p99_ms=statistics.median(s.result.p99_us for s in group) / 1000,
        megabytes_per_s=statistics.median(s.result.megabytes_per_s for s in group),
        peak_rss_mib=_median_or_none(rss),
        cpu_us_per_request=_median_or_none(
            [
                1e6 * s.proxy_cpu_s / s.result.requests
                for s in group
                if s.proxy_cpu_s is not None and s.result.requests
            ]
        ),
        errors=sum(sample.result.errors for sample in group),
        other_proxy_core_pct=_median_or_none([o.proxy_core_pct for o in loads]),
        other_load_core_pct=_median_or_none([o.load_core_pct for o in loads]),
        load_core_ours_pct=_median_or_none([o.load_core_ours_pct for o in loads]),
        notes=tuple(dict.fromkeys(s.note for s in group if s.note)),
    )


def summarize(samples: Sequence[Sample]) -> list[Row]:
    """Group samples by scenario and target, in the order they were first taken."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.scenario, sample.target), []).append(sample)
    rows = [_row(group) for group in groups.values()]
    scenario_order = list(dict.fromkeys(row.scenario for row in rows))
    target_order = ["direct", NGINX, PGPROXY, BARE]
    return sorted(
        rows,
        key=lambda row: (
            scenario_order.index(row.scenario),
            target_order.index(row.target) if row.target in target_order else 99,
        ),
    )


def find(rows: Sequence[Row], scenario: str, target: str) -> Row | None:
    """Return the row of `target` on `scenario`, or None when not measured."""
    for row in rows:
        if row.scenario == scenario and row.target == target:
            return row
    return None


def _pair(rows: Sequence[Row], scenario: str) -> tuple[Row, Row] | None:
    nginx, pgproxy = find(rows, scenario, NGINX), find(rows, scenario, PGPROXY)
    if nginx is None or pgproxy is None:
        return None
    return nginx, pgproxy


def _not_measured(name: str, bar: str) -> TargetCheck:
    return TargetCheck(name, bar, "not measured", None)


def _keepalive_checks(rows: Sequence[Row]) -> list[TargetCheck]:
    name = "1 worker, 100 B keep-alive: req/s"
    bar = f"at least {MIN_REQUESTS_RATIO:.0%} of nginx's"
    pair = _pair(rows, "keepalive-100b")
    if pair is None:
        return [_not_measured(name, bar), _not_measured(P99_NAME, P99_BAR)]
    nginx, pgproxy = pair
    rate_ratio = pgproxy.requests_per_s / nginx.requests_per_s
    p99_ratio = pgproxy.p99_ms / nginx.p99_ms
    return [
        TargetCheck(
            name,
            bar,
            f"{rate_ratio:.0%} ({pgproxy.requests_per_s:,.0f} vs "
            f"{nginx.requests_per_s:,.0f})",
            rate_ratio >= MIN_REQUESTS_RATIO,
        ),
        TargetCheck(
            P99_NAME,
            P99_BAR,
            f"{p99_ratio:.2f}x ({pgproxy.p99_ms:.2f} ms vs {nginx.p99_ms:.2f} ms)",
            p99_ratio <= MAX_P99_RATIO,
        ),
    ]


def _large_body_check(rows: Sequence[Row], scenario: str, label: str) -> TargetCheck:
    name = f"1 MiB {label}: MB/s"
    bar = f"at least {MIN_THROUGHPUT_RATIO:.0%} of nginx's"
    pair = _pair(rows, scenario)
    if pair is None:
        return _not_measured(name, bar)
    nginx, pgproxy = pair
    ratio = pgproxy.megabytes_per_s / nginx.megabytes_per_s
    return TargetCheck(
        name,
        bar,
        f"{ratio:.0%} ({pgproxy.megabytes_per_s:,.0f} vs "
        f"{nginx.megabytes_per_s:,.0f} MB/s)",
        ratio >= MIN_THROUGHPUT_RATIO,
    )


def workers_medians(outcome: WorkersOutcome) -> dict[int, tuple[float, float]]:
    """Return median (req/s, req per CPU-second) for each worker count."""
    medians = {}
    for count in sorted({run.workers for run in outcome.runs}):
        runs = [run for run in outcome.runs if run.workers == count]
        medians[count] = (
            statistics.median(run.requests_per_s for run in runs),
            statistics.median(run.requests_per_cpu_s for run in runs),
        )
    return medians


def _workers_checks(outcome: WorkersOutcome | None) -> list[TargetCheck]:
    low, high = SHARE_RANGE
    share_name, share_bar = (
        "2 workers: connections per worker",
        (f"each between {low:.0%} and {high:.0%}"),
    )
    cpu_name = "2 workers: req/s per proxy CPU-second"
    cpu_bar = f"at least {MIN_CPU_EFFICIENCY_RATIO:.0%} of 1 worker's"
    if outcome is None or outcome.skipped or not outcome.runs:
        why = "not measured"
        if outcome is not None and outcome.skipped:
            # The reason's details are in the Workers section of the report.
            why = "skipped: " + outcome.skipped.split(" (")[0]
        return [
            TargetCheck(share_name, share_bar, why, None),
            TargetCheck(cpu_name, cpu_bar, why, None),
        ]
    shares = [
        s for run in outcome.runs if run.workers == 2 for s in run.connection_shares
    ]
    medians = workers_medians(outcome)
    ratio = medians[2][1] / medians[1][1]
    return [
        TargetCheck(
            share_name, share_bar,
            f"{min(shares):.0%} to {max(shares):.0%} over all runs",
            all(low <= share <= high for share in shares),
        ),
        TargetCheck(
            cpu_name, cpu_bar,
            f"{ratio:.0%} ({medians[2][1]:,.0f} vs {medians[1][1]:,.0f})",
            ratio >= MIN_CPU_EFFICIENCY_RATIO,
        ),
    ]  # fmt: skip


def _idle_check(idle: Sequence[IdleResult]) -> TargetCheck:
    name = "1,000 idle keep-alive connections: peak RSS per worker"
    bar = f"under {MAX_IDLE_RSS_MIB:.0f} MiB"
    for result in idle:
        if result.target == PGPROXY:
            peak = result.hwm_max_kib / MIB
            return TargetCheck(name, bar, f"{peak:.1f} MiB", peak < MAX_IDLE_RSS_MIB)
    return _not_measured(name, bar)


def check_targets(
    rows: Sequence[Row],
    idle: Sequence[IdleResult],
    workers: WorkersOutcome | None,
) -> list[TargetCheck]:
    """Compare the measurements with every target."""
    return [
        *_keepalive_checks(rows),
        _large_body_check(rows, "download-1m", "responses"),
        _large_body_check(rows, "upload-1m", "request bodies"),
        *_workers_checks(workers),
        _idle_check(idle),
    ]
