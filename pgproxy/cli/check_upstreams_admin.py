"""`pgproxy check-upstreams --admin URL`: report the live health of a running pgproxy.

Instead of probing, this reads the /status document of a running instance's
admin listener, so it shows what the data plane uses right now: the active
checks' verdicts and the passive ejections of real traffic. With several
workers an endpoint has the least healthy status any worker has for it.

The exit codes match a probing run: 0 every endpoint is up, 1 some are down
but every cluster has a healthy endpoint, 2 a cluster has no healthy
endpoint, 3 the status could not be read or an unknown cluster was named.
Exit code 3 also covers a document that does not match the `StatusDocument`
model of what pgproxy sends.

/status gives `since`, the time of an endpoint's last status change, as a
reading of the admin's monotonic clock, and `monotonic_now` as the reading
when the document was built. The report shows their difference as an age
("12s ago"), and the JSON output adds it per endpoint as `status_age_s`. A
document without `monotonic_now`, from an older pgproxy, gets no age.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import anyio
import httpcore
import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

EXIT_ALL_UP = 0
EXIT_SOME_DOWN = 1
EXIT_CLUSTER_DOWN = 2
EXIT_NOT_CHECKED = 3

# An estimate: /status has about 400 bytes per endpoint, so 32 MiB is
# far beyond any real config.
MAX_STATUS_BYTES = 32 * 1024 * 1024


class AdminStatusError(Exception):
    """The /status document could not be fetched or is not what pgproxy sends."""


def status_url(admin: str) -> str:
    """Return the /status URL of an admin address (`host:port` or `http://...`)."""
    base = admin if "://" in admin else f"http://{admin}"
    if not base.startswith("http://"):
        raise AdminStatusError(
            f'invalid admin URL "{admin}": expected http://host:port'
        )
    return base.rstrip("/") + "/status"


class EndpointState(BaseModel):
    """One endpoint of a /status cluster (other keys are kept as they are)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["healthy", "unhealthy", "ejected"]
    since: float | None = None
    reason: str | None = None


class ConfigState(BaseModel):
    """The `config` object of /status: the config file in force."""

    model_config = ConfigDict(extra="allow")

    file: str | None = None
    hash: str | None = None


class StatusDocument(BaseModel):
    """The parts of the /status document that this command reads."""

    model_config = ConfigDict(extra="allow")

    config: ConfigState = Field(default_factory=ConfigState)
    monotonic_now: float | None = None
    clusters: dict[str, dict[str, EndpointState]]


def fetch_status(admin: str, timeout_s: float) -> dict[str, Any]:
    """Fetch and check the /status document; raise AdminStatusError on failure.

    `timeout_s` bounds the whole fetch (connect, request and body), not each
    read, so a server that trickles its response cannot stretch it.
    """
    url = status_url(admin)
    try:
        status, body = anyio.run(_fetch, url, timeout_s)
    except TimeoutError:
        raise AdminStatusError(
            f"could not read {url}: no complete response within {timeout_s:g}s"
        ) from None
    except (httpcore.NetworkError, httpcore.TimeoutException) as exc:
        raise AdminStatusError(
            f"could not read {url}: {exc or type(exc).__name__}"
        ) from None
    except (httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        raise AdminStatusError(
            f"{url} did not respond as an HTTP/1.1 server: {exc or type(exc).__name__}"
        ) from None
    if status != 200:
        raise AdminStatusError(f"{url} returned HTTP {status}")
    return parse_status(url, body)


def parse_status(url: str, body: bytes) -> dict[str, Any]:
    """Parse and check a /status body; raise AdminStatusError naming the mismatch."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise AdminStatusError(f"{url} did not return JSON") from None
    try:
        checked = StatusDocument.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the document"
        raise AdminStatusError(
            f"{url} did not return a pgproxy /status document: {where}: {first['msg']}"
        ) from None
    return checked.model_dump()


async def _fetch(url: str, timeout_s: float) -> tuple[int, bytes]:
    with anyio.fail_after(timeout_s):
        async with httpcore.AsyncConnectionPool() as pool:
            async with pool.stream("GET", url) as response:
                body = bytearray()
                async for chunk in response.aiter_stream():
                    body += chunk
                    if len(body) > MAX_STATUS_BYTES:
                        raise AdminStatusError(
                            f"{url} sent over {MAX_STATUS_BYTES} bytes; "
                            "that is no pgproxy /status document"
                        )
                return response.status, bytes(body)


def select_clusters(
    clusters: Mapping[str, Any], names: Sequence[str]
) -> dict[str, Mapping[str, Any]]:
    """Keep the named clusters (all when `names` is empty); ValueError if unknown."""
    if not names:
        return dict(clusters)
    unknown = [name for name in names if name not in clusters]
    if unknown:
        known = ", ".join(clusters) or "none"
        raise ValueError(f"unknown cluster {', '.join(unknown)} (clusters: {known})")
    return {name: clusters[name] for name in dict.fromkeys(names)}


def exit_code(clusters: Mapping[str, Mapping[str, Any]]) -> int:
    """Return the exit code that sums up the clusters' endpoint statuses."""
    statuses = [
        [state.get("status") for state in endpoints.values()]
        for endpoints in clusters.values()
    ]
    if any(group and "healthy" not in group for group in statuses):
        return EXIT_CLUSTER_DOWN
    if any(status != "healthy" for group in statuses for status in group):
        return EXIT_SOME_DOWN
    return EXIT_ALL_UP


def status_age(document: Mapping[str, Any], state: Mapping[str, Any]) -> float | None:
    """Return the seconds since the endpoint's last status change, or None."""
    now = document.get("monotonic_now")
    since = state.get("since")
    if now is None or since is None:
        return None
    # pgproxy reads `monotonic_now` after every `since` it reports, so only a
    # document from elsewhere can give a negative age. It is shown as 0s.
    return max(0.0, float(now) - float(since))


def format_age(seconds: float) -> str:
    """Format an age in seconds as "45s ago", "12m 5s ago", "3h 4m ago", "2d 5h ago"."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s ago"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs}s ago"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m ago"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h ago"


def report_json(
    admin: str, document: Mapping[str, Any], clusters: Mapping[str, Any]
) -> dict[str, Any]:
    """Build the JSON output: the selected clusters as /status reports them.

    Each endpoint also gets `status_age_s`, the seconds since `since`
    (None when the document has no `monotonic_now`).
    """
    return {
        "admin": admin,
        "config": document.get("config", {}),
        "exit_code": exit_code(clusters),
        "clusters": [
            {
                "name": name,
                "healthy": sum(
                    1 for s in endpoints.values() if s.get("status") == "healthy"
                ),
                "total": len(endpoints),
                "endpoints": [
                    {
                        "address": address,
                        **state,
                        "status_age_s": _rounded(status_age(document, state)),
                    }
                    for address, state in endpoints.items()
                ],
            }
            for name, endpoints in clusters.items()
        ],
    }


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def render_text(
    console: Console, document: Mapping[str, Any], clusters: Mapping[str, Any]
) -> None:
    """Print the config in force, then one table and summary line per cluster."""
    config = document.get("config", {})
    console.print(
        Text(f"config {config.get('file')} (hash {str(config.get('hash'))[:12]})")
    )
    for name, endpoints in clusters.items():
        table = Table(title=f"cluster {name} (live state)", title_justify="left")
        for column in ("endpoint", "verdict", "status", "since", "reason"):
            table.add_column(column, overflow="fold")
        healthy = 0
        for address, state in endpoints.items():
            status = str(state.get("status"))
            healthy += status == "healthy"
            table.add_row(
                Text(address),
                Text(
                    "UP" if status == "healthy" else "DOWN",
                    style="green" if status == "healthy" else "red",
                ),
                Text(status),
                _since_cell(document, state),
                Text(str(state.get("reason") or "")),
            )
        console.print(table)
        verdict = (
            "[green]can serve[/]"
            if healthy
            else "[bold red]cannot serve: no healthy endpoint[/]"
        )
        console.print(f"{name}: {healthy}/{len(endpoints)} healthy, {verdict}")
        console.print()


def _since_cell(document: Mapping[str, Any], state: Mapping[str, Any]) -> str:
    age = status_age(document, state)
    return "" if age is None else format_age(age)


def check_admin(
    admin: str, names: Sequence[str], timeout_s: float, output_format: str
) -> int:
    """Read a running instance's /status, print the report, return the exit code."""
    errors = Console(stderr=True)
    try:
        document = fetch_status(admin, timeout_s)
        clusters = select_clusters(document["clusters"], names)
    except (AdminStatusError, ValueError) as exc:
        errors.print(f"error: {exc}", markup=False, highlight=False)
        if output_format == "json":
            print_json(
                {
                    "admin": admin,
                    "exit_code": EXIT_NOT_CHECKED,
                    "error": str(exc),
                    "clusters": [],
                }
            )
        return EXIT_NOT_CHECKED
    if output_format == "json":
        print_json(report_json(admin, document, clusters))
    else:
        render_text(Console(), document, clusters)
    return exit_code(clusters)


def print_json(document: Mapping[str, Any]) -> None:
    """Print a JSON document on stdout."""
    typer.echo(json.dumps(document, indent=2))
