"""The report section that compares pgproxy with the bare proxy.

The bare proxy runs on pgproxy's stack with only the work a proxy cannot
skip. Its ratio to nginx is what the stack reaches on the machine, and the
gap between pgproxy and bare is the cost of pgproxy's own code.
"""

from __future__ import annotations

from collections.abc import Sequence

from harness.measure import BARE, NGINX, PGPROXY
from harness.summary import Row, find

HEADLINE_SCENARIO = "keepalive-100b"

SETUP_NOTE = """- bare: `bench/bare_proxy.py`, a keep-alive HTTP/1.1 proxy written for
  this benchmark only, on pgproxy's stack (uvloop, httptools, asyncio
  Protocols) and started the same way as pgproxy. It parses each request
  head, forwards it to the upstream over a pooled keep-alive connection,
  parses the response head and relays both bodies, with pgproxy's write
  buffer limits and glibc malloc settings. It drops hop-by-hop headers and
  does nothing else: no routing, balancing, health checks, timeouts,
  X-Forwarded-For or logging."""


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def _cpu(row: Row) -> str:
    if row.cpu_us_per_request is None:
        return "-"
    return f"{row.cpu_us_per_request:.1f}"


def _headline(rows: Sequence[Row]) -> str:
    pgproxy = find(rows, HEADLINE_SCENARIO, PGPROXY)
    bare = find(rows, HEADLINE_SCENARIO, BARE)
    nginx = find(rows, HEADLINE_SCENARIO, NGINX)
    if pgproxy is None or bare is None:
        return ""
    text = (
        f"On `{HEADLINE_SCENARIO}`, pgproxy served "
        f"{pgproxy.requests_per_s / bare.requests_per_s:.0%} of bare's req/s"
    )
    if pgproxy.cpu_us_per_request and bare.cpu_us_per_request:
        cpu_ratio = pgproxy.cpu_us_per_request / bare.cpu_us_per_request
        text += f" and spent {cpu_ratio:.2f}x its CPU time per request"
    if nginx is not None:
        text += (
            f". bare itself served "
            f"{bare.requests_per_s / nginx.requests_per_s:.0%} of nginx's req/s"
        )
    return text + ".\n"


def render_stack_ceiling(rows: Sequence[Row]) -> str:
    """Render pgproxy against bare on every scenario both were measured on."""
    cells = []
    for row in rows:
        if row.target != BARE:
            continue
        pgproxy = find(rows, row.scenario, PGPROXY)
        if pgproxy is None:
            continue
        cells.append(
            [
                row.scenario,
                f"{pgproxy.requests_per_s:,.0f}",
                f"{row.requests_per_s:,.0f}",
                _ratio(pgproxy.requests_per_s, row.requests_per_s),
                _cpu(pgproxy),
                _cpu(row),
                _ratio(pgproxy.cpu_us_per_request, row.cpu_us_per_request),
            ]
        )
    if not cells:
        return ""
    header = (
        "scenario", "pgproxy req/s", "bare req/s", "pgproxy / bare req/s",
        "pgproxy CPU µs/req", "bare CPU µs/req", "pgproxy / bare CPU µs/req",
    )  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    table = "\n".join(lines)
    return f"""## pgproxy against the bare stack

`bare` is the minimal proxy described under Setup, on the same stack as
pgproxy. Its ratio to nginx is what that stack reaches on this machine, so
the difference between pgproxy and bare is the cost of pgproxy's own code
and features. CPU µs/req compares them even when other load on the machine
disturbs req/s.

{table}

{_headline(rows)}"""
