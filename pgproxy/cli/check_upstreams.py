"""`pgproxy check-upstreams`: probe every endpoint once and report per cluster.

Each endpoint gets its cluster's health check (a TCP connect, bounded by the
cluster's connect_timeout, when none is configured). Probes run concurrently,
at most MAX_CONCURRENT_PROBES at a time, and `--timeout` bounds the whole run.
A probe that starts near the bound gets only the time left. A probe that
cannot start before the bound is reported as SKIPPED. The command opens no
listener and routes no traffic. With `--admin URL` it probes nothing and
reads the live state of a running pgproxy instead (see
`pgproxy.cli.check_upstreams_admin`).

Exit codes: 0 every endpoint is up, 1 some are down but every cluster has a
healthy endpoint, 2 a cluster has no healthy endpoint, 3 the check could not
be done (invalid config, unreadable file, unknown cluster, invalid option, or
endpoints skipped at the bound). The JSON output is described in
docs/check-upstreams.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
import anyio.to_thread
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand

from pgproxy.cli.check_upstreams_admin import check_admin
from pgproxy.config.units import parse_duration
from pgproxy.errors import ConfigError
from pgproxy.graph.load import load_graph
from pgproxy.graph.settings import HealthCheckSettings
from pgproxy.graph.types import Cluster, Endpoint
from pgproxy.health.active import (
    ProbeResult,
    Stage,
    load_tls_contexts,
    probe_endpoint,
)

JSON_VERSION = 1
# Hanging endpoints hold only a part of this many slots, so 200 endpoints of
# which 50 hang take about one probe timeout. It stays far below the usual
# open-file limit of 1024.
MAX_CONCURRENT_PROBES = 128

EXIT_ALL_UP = 0
EXIT_SOME_DOWN = 1
EXIT_CLUSTER_DOWN = 2
EXIT_NOT_CHECKED = 3

_STAGE_LABELS = {
    Stage.DNS: "DNS",
    Stage.TCP_REFUSED: "TCP refused",
    Stage.TCP_TIMEOUT: "TCP timeout",
    Stage.TLS: "TLS",
    Stage.HTTP_TIMEOUT: "HTTP timeout",
    Stage.HTTP_STATUS: "HTTP status",
    Stage.PROTOCOL_ERROR: "protocol error",
    Stage.OK: "",
}


class CheckUpstreamsCommand(TyperCommand):
    """Exit with 3 on usage errors, because 2 means a cluster is down here."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except typer.TyperException as exc:
            # Usage errors of the parser (unknown option, missing argument).
            if getattr(exc, "exit_code", None) == 2:
                exc.exit_code = EXIT_NOT_CHECKED
            raise


@dataclass(frozen=True, slots=True)
class EndpointReport:
    """One endpoint and its probe result; `result` is None when skipped."""

    endpoint: Endpoint
    result: ProbeResult | None

    @property
    def up(self) -> bool:
        return self.result is not None and self.result.ok

    @property
    def verdict(self) -> str:
        if self.result is None:
            return "SKIPPED"
        return "UP" if self.result.ok else "DOWN"

    def stage_label(self) -> str:
        """Return the failing stage as shown in the table, empty when up."""
        if self.result is None:
            return "not probed"
        label = _STAGE_LABELS[self.result.stage]
        if self.result.stage is Stage.HTTP_STATUS:
            return f"{label} {self.result.status}"
        return label


@dataclass(frozen=True, slots=True)
class ClusterReport:
    """The probe results of one cluster."""

    cluster: Cluster
    endpoints: tuple[EndpointReport, ...]

    @property
    def healthy(self) -> int:
        return sum(1 for report in self.endpoints if report.up)

    @property
    def can_serve(self) -> bool:
        return self.healthy > 0


def probe_timeout(cluster: Cluster) -> float:
    """Return the per-probe timeout: the check's, or the connect_timeout for TCP."""
    check = cluster.settings.health_check
    return check.timeout if check is not None else cluster.settings.connect_timeout


async def check_clusters(
    clusters: Sequence[Cluster],
    bound_s: float,
    max_concurrent: int = MAX_CONCURRENT_PROBES,
) -> list[ClusterReport]:
    """Probe every endpoint of `clusters` once, all within `bound_s` seconds."""
    limiter = anyio.CapacityLimiter(max_concurrent)
    deadline = anyio.current_time() + bound_s
    results: dict[tuple[str, str], ProbeResult] = {}

    async def probe(cluster: Cluster, endpoint: Endpoint) -> None:
        async with limiter:
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                return
            timeout = min(probe_timeout(cluster), remaining)
            check = cluster.settings.health_check
            result = await probe_endpoint(
                endpoint, check, timeout, ca_file=cluster.settings.tls_ca_file
            )
            results[(cluster.name, endpoint.address)] = result

    await anyio.to_thread.run_sync(load_tls_contexts, clusters)
    async with anyio.create_task_group() as group:
        for cluster in clusters:
            for endpoint in cluster.endpoints:
                group.start_soon(probe, cluster, endpoint)

    return [
        ClusterReport(
            cluster,
            tuple(
                EndpointReport(ep, results.get((cluster.name, ep.address)))
                for ep in cluster.endpoints
            ),
        )
        for cluster in clusters
    ]


def exit_code(reports: Sequence[ClusterReport]) -> int:
    """Return the exit code that sums up `reports`."""
    every = [ep for report in reports for ep in report.endpoints]
    if any(ep.result is None for ep in every):
        return EXIT_NOT_CHECKED
    if any(not report.can_serve for report in reports):
        return EXIT_CLUSTER_DOWN
    if any(not ep.up for ep in every):
        return EXIT_SOME_DOWN
    return EXIT_ALL_UP


def describe_check(cluster: Cluster) -> dict[str, Any]:
    """Return the check used for `cluster`, as written in the JSON output."""
    check: HealthCheckSettings | None = cluster.settings.health_check
    if check is None or check.type == "tcp":
        return {"type": "tcp", "timeout_s": probe_timeout(cluster)}
    return {
        "type": "http",
        "method": check.method,
        "path": check.path,
        "expect_status": check.expect_status,
        "timeout_s": check.timeout,
    }


def report_json(
    config: str, reports: Sequence[ClusterReport], duration_s: float
) -> dict[str, Any]:
    """Build the JSON document of a finished check (shape version 1)."""
    return {
        "version": JSON_VERSION,
        "config": config,
        "exit_code": exit_code(reports),
        "duration_s": round(duration_s, 3),
        "error": None,
        "clusters": [_cluster_json(report) for report in reports],
    }


def _cluster_json(report: ClusterReport) -> dict[str, Any]:
    return {
        "name": report.cluster.name,
        "check": describe_check(report.cluster),
        "healthy": report.healthy,
        "total": len(report.endpoints),
        "can_serve": report.can_serve,
        "endpoints": [_endpoint_json(ep) for ep in report.endpoints],
    }


def _endpoint_json(report: EndpointReport) -> dict[str, Any]:
    result = report.result
    return {
        "address": report.endpoint.address,
        "verdict": report.verdict,
        "stage": None if result is None else result.stage.value,
        "status": None if result is None else result.status,
        "latency_ms": None if result is None else round(result.latency_s * 1000, 1),
        "detail": "not probed before the --timeout bound"
        if result is None
        else result.detail,
    }


def error_json(config: str, message: str, diagnostics: list[str]) -> dict[str, Any]:
    """Build the JSON document of a check that could not run."""
    return {
        "version": JSON_VERSION,
        "config": config,
        "exit_code": EXIT_NOT_CHECKED,
        "duration_s": 0.0,
        "error": message,
        "diagnostics": diagnostics,
        "clusters": [],
    }


def render_text(console: Console, reports: Sequence[ClusterReport]) -> None:
    """Print one table and one summary line per cluster."""
    for report in reports:
        console.print(_cluster_table(report))
        console.print(_summary_line(report))
        console.print()


def _cluster_table(report: ClusterReport) -> Table:
    check = describe_check(report.cluster)
    check_text = (
        f"{check['method']} {check['path']}, expect {check['expect_status']}"
        if check["type"] == "http"
        else "TCP connect"
    )
    table = Table(
        title=f"cluster {report.cluster.name} ({check_text})", title_justify="left"
    )
    for column in ("endpoint", "verdict", "stage", "status", "latency", "detail"):
        table.add_column(column, overflow="fold")
    for ep in report.endpoints:
        result = ep.result
        style = "green" if ep.up else "red"
        # Addresses ("[::1]:80") and details are plain Text, not rich markup.
        table.add_row(
            Text(ep.endpoint.address),
            Text(ep.verdict, style=style),
            Text(ep.stage_label()),
            "" if result is None or result.status is None else str(result.status),
            "" if result is None else f"{result.latency_s * 1000:.1f} ms",
            Text("" if result is None or result.ok else result.detail),
        )
    return table


def _summary_line(report: ClusterReport) -> str:
    total = len(report.endpoints)
    if report.can_serve:
        verdict = "[green]can serve[/]"
    else:
        verdict = "[bold red]cannot serve: no healthy endpoint[/]"
    return f"{report.cluster.name}: {report.healthy}/{total} healthy, {verdict}"


def _fail(
    config: str, output_format: str, message: str, diagnostics: Sequence[str] = ()
) -> typer.Exit:
    errors = Console(stderr=True)
    for line in diagnostics:
        # soft_wrap: one diagnostic stays on one line, for grep and editors.
        errors.print(line, markup=False, highlight=False, soft_wrap=True)
    errors.print(f"error: {message}", markup=False, highlight=False)
    if output_format == "json":
        document = error_json(config, message, list(diagnostics))
        typer.echo(json.dumps(document, indent=2))
    return typer.Exit(EXIT_NOT_CHECKED)


def _select(clusters: dict[str, Cluster], names: list[str]) -> list[Cluster]:
    if not names:
        return list(clusters.values())
    unknown = [name for name in names if name not in clusters]
    if unknown:
        known = ", ".join(clusters) or "none"
        raise ValueError(f"unknown cluster {', '.join(unknown)} (clusters: {known})")
    return [clusters[name] for name in dict.fromkeys(names)]


def check_upstreams_command(
    config: Annotated[
        str | None,
        typer.Argument(help="Path of the TOML config file (not needed with --admin)."),
    ] = None,
    cluster: Annotated[
        list[str] | None,
        typer.Option("--cluster", help="Check only this cluster; repeat for several."),
    ] = None,
    timeout: Annotated[
        str,
        typer.Option(
            "--timeout",
            help='Bound on the whole check, with a unit ("500ms", "10s", "1m").',
        ),
    ] = "10s",
    output_format: Annotated[
        str,
        typer.Option("--format", help='Output format: "text" (tables) or "json".'),
    ] = "text",
    admin: Annotated[
        str | None,
        typer.Option(
            "--admin",
            help="Read the live state (probe verdicts and passive ejections) "
            "from the /status of a running pgproxy's admin listener, "
            'such as "127.0.0.1:9901", instead of probing.',
        ),
    ] = None,
) -> None:
    """Probe every endpoint once with its cluster's health check and report.

    Exit codes: 0 all up, 1 some down but every cluster can serve, 2 a
    cluster has no healthy endpoint, 3 could not check.
    """
    if output_format not in ("text", "json"):
        raise _fail(
            config or "",
            "text",
            f'invalid --format "{output_format}": use text or json',
        )
    try:
        bound_s = parse_duration(timeout)
    except ValueError as exc:
        raise _fail(config or "", output_format, f"invalid --timeout: {exc}") from None
    if admin is not None:
        raise typer.Exit(check_admin(admin, cluster or [], bound_s, output_format))
    if config is None:
        raise _fail("", output_format, "missing CONFIG (or --admin URL)")
    try:
        graph = load_graph(config).graph
    except ConfigError as exc:
        lines = [item.render() for item in exc.diagnostics]
        raise _fail(config, output_format, "invalid config", lines) from None
    try:
        clusters = _select(dict(graph.clusters), cluster or [])
    except ValueError as exc:
        raise _fail(config, output_format, str(exc)) from None

    started = time.monotonic()
    reports = anyio.run(check_clusters, clusters, bound_s)
    duration_s = time.monotonic() - started
    if output_format == "json":
        typer.echo(json.dumps(report_json(config, reports, duration_s), indent=2))
    else:
        render_text(Console(), reports)
    raise typer.Exit(exit_code(reports))
