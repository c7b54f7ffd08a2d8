"""`pgproxy explain CONFIG "METHOD URL"`: which route and endpoint a request gets.

The command loads the config as `pgproxy run` would and matches the request
with the same router. It lists the routes ranked before the winner with the
condition each one failed, and the routes that also matched with the rule
they lost on. Then it names the endpoint the cluster's balancer would pick.
The pick is the first candidate of a freshly built balancer. It is
deterministic for consistent_hash and round_robin, and drawn from a
generator seeded with 0 for least_request and random. Health is not checked.

A path with a spelling that the listener's `reject_ambiguous_paths` lists
is answered with 400 before routing, so the command names the spelling and
shows no routes.

Exit codes: 0 a route matches; 1 no route matches (pgproxy answers 404) or
the listener's reject_ambiguous_paths rejects the path (400); 2 a usage
error, an invalid config, or a request that pgproxy rejects as malformed
before routing (400 or 501: a space or control byte in the target, a
method that is not a token or that pgproxy's HTTP parser does not accept,
a fragment, a Host that is not host[:port]).
"""

from __future__ import annotations

import itertools
import random
import urllib.parse
from dataclasses import dataclass
from typing import Annotated

import httptools
import typer
from rich.console import Console
from rich.text import Text

from pgproxy.balancing import build_balancer, hash_key_value
from pgproxy.cli.render import fail, make_console
from pgproxy.cli.validate_formats import FileResult, write_text
from pgproxy.errors import ConfigError
from pgproxy.graph.load import load_graph
from pgproxy.graph.paths import AmbiguousPathRule, InvalidPathError, normalize_path
from pgproxy.graph.routing import MatchExplanation, RouteVerdict, explain_match
from pgproxy.graph.settings import RedirectSettings
from pgproxy.graph.types import Graph, Route
from pgproxy.proxy.framing import (
    TOKEN_RE,
    FramingError,
    check_field,
    check_target,
    host_without_port,
)
from pgproxy.proxy.respond import Redirect

EXIT_MATCH = 0
EXIT_NO_MATCH = 1
EXIT_USAGE = 2
# Candidates shown after the pick, for the order retries would follow.
SHOWN_FALLBACKS = 4


@dataclass(frozen=True, slots=True)
class ExplainRequest:
    """The request to explain, split into the parts that routing reads."""

    method: str
    host: str | None
    port: int | None
    path: str
    query: str
    headers: dict[str, str]
    client_ip: str
    # The path that routes match: decoded, dot segments removed (graph.paths).
    routed_path: str


def parse_request(
    request_line: str, header_lines: list[str], client_ip: str
) -> ExplainRequest:
    """Parse `"METHOD URL"` and `Name: value` lines; raise ValueError if invalid.

    The URL is absolute (`http://host[:port]/path?query`) or a path, in which
    case the Host comes from a `Host:` header. An absolute URL's authority
    replaces any Host header, as for absolute-form targets (RFC 9112
    section 3.2.2).
    """
    method, _, target = request_line.strip().partition(" ")
    target = target.strip()
    if not method or not target:
        raise ValueError(
            f'invalid request "{request_line}": expected "METHOD URL", such as '
            '"GET http://api.example.com/v1/users"'
        )
    if not TOKEN_RE.match(method.encode("utf-8")):
        raise ValueError(
            f"invalid method {method!r}: expected a token such as GET "
            "(pgproxy responds with 400)"
        )
    _check_method(method.upper())
    headers = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise ValueError(f'invalid header {line!r}: expected "Name: value"')
        _check_header(name, value.strip())
        headers[name.lower()] = value.strip()
    if "#" in target:
        raise ValueError(
            f'invalid URL "{target}": a request target has no fragment "#" '
            "(pgproxy responds with 400)"
        )
    try:
        url = urllib.parse.urlsplit(target)
        port = url.port if url.scheme else None
    except ValueError as error:
        # urllib's message, such as "Port out of range 0-65535".
        raise ValueError(f'invalid URL "{target}": {error}') from None
    if url.scheme and url.scheme not in ("http", "https"):
        raise ValueError(f'invalid URL "{target}": the scheme must be http or https')
    if not url.scheme and not target.startswith("/"):
        raise ValueError(f'invalid URL "{target}": expected http://host/path or /path')
    _check_target(method, target)
    if url.scheme:
        headers["host"] = url.netloc
        port = port or (443 if url.scheme == "https" else 80)
    if headers.get("host"):
        _check_host(headers["host"])
    path = url.path or "/"
    try:
        routed_path = normalize_path(path)
    except InvalidPathError as error:
        raise ValueError(
            f'invalid URL "{target}": {error} (pgproxy responds with 400)'
        ) from None
    return ExplainRequest(
        method=method.upper(),
        host=headers.get("host"),
        port=port,
        path=path,
        query=url.query,
        headers=headers,
        client_ip=client_ip,
        routed_path=routed_path,
    )


def _check_method(method: str) -> None:
    """Raise ValueError when pgproxy's HTTP parser rejects `method` before routing.

    pgproxy parses requests with llhttp (httptools), which accepts a fixed
    list of methods, and pgproxy responds with 501 to any other token. A few
    methods of that list (RTSP's DESCRIBE, HTTP/2's PRI) are invalid in an
    HTTP/1.1 request line and get 400.
    """
    parser = httptools.HttpRequestParser(_NoCallbacks())
    try:
        parser.feed_data(b"%b / HTTP/1.1\r\nHost: x\r\n\r\n" % method.encode())
    except httptools.HttpParserUpgrade:
        return  # CONNECT: the parser accepts it, and _check_target rejects it
    except httptools.HttpParserInvalidMethodError:
        raise ValueError(
            f'method "{method}" is not implemented: pgproxy serves only the '
            "methods that its HTTP parser, llhttp, accepts (pgproxy responds "
            "with 501)"
        ) from None
    except httptools.HttpParserError as error:
        raise ValueError(
            f'invalid method "{method}": {error} (pgproxy responds with 400)'
        ) from None


class _NoCallbacks:
    """A parser protocol without callbacks: `_check_method` needs only errors."""


def _check_target(method: str, target: str) -> None:
    """Raise ValueError when pgproxy rejects `target` as the client would send it.

    A client sends the text as UTF-8, and pgproxy accepts only visible ASCII in
    the path and query, so a space, a control or a non-ASCII character there
    is rejected before routing. Such characters must be percent-encoded.
    """
    try:
        check_target(method.upper().encode("utf-8"), target.encode("utf-8"))
    except FramingError as error:
        message = (
            f"invalid URL {target!r}: {error} (pgproxy responds with {error.status})"
        )
        if any(not "!" <= char <= "~" for char in target):
            message += ". Percent-encode spaces, controls and non-ASCII characters."
        raise ValueError(message) from None


def _check_host(host: str) -> None:
    """Raise ValueError when pgproxy rejects the Host value with 400."""
    try:
        host_without_port(host.encode("utf-8"))
    except FramingError:
        raise ValueError(
            f"invalid Host {host!r}: expected host[:port], such as "
            "api.example.com:8080 (pgproxy responds with 400)"
        ) from None


def _check_header(name: str, value: str) -> None:
    """Raise ValueError when pgproxy rejects the header field with 400."""
    try:
        check_field(name.encode("utf-8"), value.encode("utf-8"))
    except FramingError as error:
        raise ValueError(
            f"invalid header {name!r}: {error} (pgproxy responds with 400)"
        ) from None


def choose_listener(graph: Graph, request: ExplainRequest) -> tuple[str, str | None]:
    """Pick the listener that would receive the request, and a note on the choice."""
    names = list(graph.listeners)
    on_port = [n for n in names if graph.listeners[n].port == request.port]
    if len(on_port) == 1:
        return on_port[0], None
    if len(names) == 1:
        return names[0], None
    return names[0], (
        f"assumed listener {names[0]}; pass --listener to choose one of "
        + ", ".join(names)
    )


def explain_command(
    config: Annotated[str, typer.Argument(metavar="CONFIG", help="Config file.")],
    request_line: Annotated[
        str,
        typer.Argument(
            metavar='"METHOD URL"',
            help='The request, such as "GET http://api.example.com/v1/users?id=7".',
        ),
    ],
    header: Annotated[
        list[str] | None,
        typer.Option(
            "--header",
            "-H",
            metavar='"Name: value"',
            help="A request header; repeatable.",
        ),
    ] = None,
    client_ip: Annotated[
        str,
        typer.Option(help='Client address, used by hash_key = "client_ip".'),
    ] = "127.0.0.1",
    listener: Annotated[
        str | None,
        typer.Option(help="Listener that receives the request; default by URL port."),
    ] = None,
    show_all: Annotated[
        bool,
        typer.Option("--all", help="List every route, not only the relevant ones."),
    ] = False,
) -> None:
    """Show which route a request matches, why others do not, and the endpoint.

    Exit status: 0 a route matches, 1 no route matches or the listener
    rejects the path, 2 usage error or invalid config.
    """
    try:
        request = parse_request(request_line, header or [], client_ip)
    except ValueError as error:
        raise fail(str(error), EXIT_USAGE) from None
    try:
        graph = load_graph(config).graph
    except ConfigError as error:
        write_text(
            make_console(stderr=True),
            [FileResult(config, tuple(error.diagnostics))],
            False,
        )
        raise typer.Exit(EXIT_USAGE) from None
    note = None
    if listener is None:
        listener, note = choose_listener(graph, request)
    elif listener not in graph.listeners:
        known = ", ".join(graph.listeners)
        raise fail(
            f'listener "{listener}" is not defined (defined: {known})', EXIT_USAGE
        )
    console = make_console()
    _print_request(console, request, listener, note)
    if _print_rejected_path(console, graph, listener, request.path):
        raise typer.Exit(EXIT_NO_MATCH)
    result = explain_match(
        graph.routes,
        listener,
        request.method,
        request.host,
        request.routed_path,
        request.headers,
    )
    _print_verdicts(console, result, show_all)
    if result.winner is None:
        console.print("no route matches: pgproxy answers 404", style="bold red")
        raise typer.Exit(EXIT_NO_MATCH)
    _print_target(console, graph, result.winner, request)
    raise typer.Exit(EXIT_MATCH)


def _print_request(
    console: Console, request: ExplainRequest, listener: str, note: str | None
) -> None:
    target = request.path + (f"?{request.query}" if request.query else "")
    host = request.host or "(no Host header)"
    console.print(
        f"request:  {request.method} {target}  host {host}  listener {listener}"
    )
    if request.routed_path != request.path:
        console.print(f"routed as: {request.routed_path}")
    if note:
        console.print(f"note: {note}", style="yellow")


def _print_rejected_path(
    console: Console, graph: Graph, listener: str, path: str
) -> bool:
    """Print why the listener rejects `path` before routing; return whether it does."""
    names = graph.listeners[listener].settings.reject_ambiguous_paths
    found = AmbiguousPathRule(names).find(path) if names else None
    if found is None:
        return False
    name, text = found
    console.print(
        Text(
            f'rejected: the path contains "{text}" and listener {listener} has '
            f'"{name}" in reject_ambiguous_paths, so pgproxy answers 400 '
            "before routing",
            style="bold red",
        )
    )
    return True


def _print_verdicts(console: Console, result: MatchExplanation, show_all: bool) -> None:
    """Print the relevant verdicts: failures before the winner, then losers.

    Routes for other hosts or listeners, and routes after the winner that do
    not match, are counted instead of listed unless `show_all` is set.
    """
    console.print("routes, most specific first:")
    skipped = 0
    reached_winner = False
    for verdict in result.verdicts:
        if verdict.route is result.winner:
            reached_winner = True
        elif (
            not show_all
            and not verdict.matched
            and (reached_winner or verdict.failed in ("host", "listener"))
        ):
            skipped += 1
            continue
        console.print(_verdict_line(verdict, verdict.route is result.winner))
    if skipped:
        console.print(
            f"  ({skipped} other routes do not match this host, listener or path; "
            "--all lists them)"
        )


def _verdict_line(verdict: RouteVerdict, is_winner: bool) -> Text:
    route = verdict.route
    label = (
        route.name
        if route.name == f"routes[{route.index}]"
        else (f"{route.name} (routes[{route.index}])")
    )
    if is_winner:
        mark, style = "=>", "bold green"
    elif verdict.matched:
        mark, style = " ~", "yellow"
    else:
        mark, style = " x", "dim"
    line = Text(f"  {mark} ", style=style)
    line.append(label, style="bold" if is_winner else "")
    line.append(f": {verdict.reason}")
    return line


def _describe_redirect(settings: RedirectSettings, request: ExplainRequest) -> str:
    """Return the redirect line, with the Location a plain-HTTP listener sends."""
    # `request.host` is the Host value, port included, as the proxy reads it.
    host = (request.host or "").encode("utf-8")
    target = request.path + (f"?{request.query}" if request.query else "")
    location = Redirect(settings).location(b"http", host, target.encode("utf-8"))
    if location is None:
        return f"redirect: {settings.status}, but the request has no Host (400)"
    text = f"redirect: {settings.status} to {location.decode('utf-8')}"
    if settings.scheme is None:
        text += " (https on a TLS listener)"
    return text


def _print_target(
    console: Console, graph: Graph, route: Route, request: ExplainRequest
) -> None:
    if route.respond is not None:
        console.print(
            f"response: {route.respond.status} sent by pgproxy itself (no upstream)",
            style="bold green",
        )
        return
    if route.redirect is not None:
        console.print(_describe_redirect(route.redirect, request), style="bold green")
        return
    assert route.cluster is not None
    cluster = graph.clusters[route.cluster]
    balancer = build_balancer(cluster, random.Random(0))

    config = cluster.settings
    key = None
    pick_reason = f"{config.balancer}, first pick of a fresh balancer"
    if config.balancer == "consistent_hash" and config.hash_key is not None:
        # A client sends the header text as UTF-8, and the proxy decodes
        # each byte as one latin-1 character, so hash what the proxy would see.
        wire_headers = {
            name: value.encode("utf-8").decode("latin-1")
            for name, value in request.headers.items()
        }
        key = hash_key_value(
            config.hash_key,
            wire_headers,
            request.routed_path,
            request.query,
            request.client_ip,
        )
        pick_reason = (
            f'consistent_hash on {config.hash_key} = "{key}"'
            if key is not None
            else f"{config.hash_key} is missing, so round robin picks"
        )

    order = list(itertools.islice(balancer.candidates(key), SHOWN_FALLBACKS + 1))
    console.print(f"cluster:  {cluster.name} ({len(cluster.endpoints)} endpoints)")
    console.print(f"endpoint: {order[0].address}  ({pick_reason})", style="bold green")
    if len(order) > 1:
        rest = ", ".join(endpoint.address for endpoint in order[1:])
        console.print(f"  if it is unhealthy or fails: {rest}")
