"""Route matching: the most specific route wins, whatever the file order.

Routes are ranked by a key compared left to right:

1. higher `priority` first;
2. exact host, then wildcard host (longer suffix first), then no host;
3. exact path, then path prefix (longer first), then path regex (first in
   the file first, as nginx tries its regex locations), then no path;
4. more conditions (a methods list counts as one, each header as one);
5. earlier in the file.

A request takes the first route in that order whose conditions all hold.
A path prefix matches on segment boundaries: `/api` matches `/api`, `/api/`
and `/api/x` but not `/apix`, and a prefix ending in `/` matches every path
that starts with it. `*.example.com` matches `a.example.com` and
`a.b.example.com` but not `example.com`. Hosts compare without port and
case-insensitively (RFC 9110 section 4.2.3).

`RouteTable` indexes routes per listener, per priority, by exact host and by
exact path or path prefix, so a typical request costs a few dict lookups
however long the table is. `explain_match` ranks every route by the same key
without an index and returns why each route lost. The tests check that both
return the same route.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from pgproxy.graph.types import Route

_HOST_EXACT, _HOST_WILDCARD, _HOST_ANY = 0, 1, 2
_PATH_RANK: Final = {"exact": 0, "prefix": 1, "regex": 2, "any": 3}
_REGEX_SPECIAL: Final = frozenset("\\.^$*+?{}[]|()")

RankKey = tuple[int, int, int, int, int, int, int]
# normalize_host results ("" for None), bounded like the Host cache of
# pgproxy.proxy.framing: values up to a DNS name (253) with a port.
_NORMALIZED_HOSTS: Final[dict[str, str]] = {}
_MAX_CACHED_HOST: Final = 300
_MAX_CACHED_HOSTS: Final = 1024


def normalize_host(host: str | None) -> str | None:
    """Lower-case a Host value and drop its port and trailing dot.

    An IPv6 literal keeps its brackets (`[::1]:8080` gives `[::1]`). An
    empty host gives None.
    """
    if not host:
        return None
    # A client sends the same Host on every request of a connection, and the
    # proxy passes the same str object each time, with its hash cached: a
    # hit costs about a quarter of lower() and rstrip() (callgrind).
    normalized = _NORMALIZED_HOSTS.get(host)
    if normalized is None:
        normalized = _normalize_host(host)
        if len(host) <= _MAX_CACHED_HOST:
            if len(_NORMALIZED_HOSTS) >= _MAX_CACHED_HOSTS:
                _NORMALIZED_HOSTS.clear()
            _NORMALIZED_HOSTS[host] = normalized
    return normalized or None


def _normalize_host(host: str) -> str:
    if host[-1] != "]" and ":" in host:
        host = host.rpartition(":")[0]
    return host.lower().rstrip(".")


def prefix_matches(prefix: str, path: str) -> bool:
    """Return whether `path` starts with `prefix` on a segment boundary."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


def wildcard_matches(pattern: str, host: str) -> bool:
    """Return whether `host` matches `*.suffix`: at least one label before it."""
    suffix = pattern[1:]
    return host.endswith(suffix) and len(host) > len(suffix)


def condition_count(route: Route) -> int:
    """Return the number of method and header conditions of a route."""
    return (route.methods is not None) + len(route.headers)


def rank_key(route: Route) -> RankKey:
    """Return the sort key that puts the most specific route first."""
    if route.host is None:
        host_class, host_length = _HOST_ANY, 0
    elif route.host.startswith("*."):
        host_class, host_length = _HOST_WILDCARD, -len(route.host)
    else:
        host_class, host_length = _HOST_EXACT, 0
    path_tiebreak = 0
    if route.path_kind == "prefix":
        path_tiebreak = -len(route.path)
    elif route.path_kind == "regex":
        path_tiebreak = route.index
    return (
        -route.priority,
        host_class,
        host_length,
        _PATH_RANK[route.path_kind],
        path_tiebreak,
        -condition_count(route),
        route.index,
    )


def conditions_hold(route: Route, method: str, headers: Mapping[str, str]) -> bool:
    """Return whether the method and header conditions of a route hold."""
    if route.methods is not None and method not in route.methods:
        return False
    for name, value in route.headers:
        if headers.get(name) != value:
            return False
    return True


def anchored_literal(pattern: re.Pattern[str]) -> str:
    """Return the literal text every match of an `^`-anchored regex starts with.

    `^/api/v[0-9]+` gives `/api/v`. An unanchored pattern, an alternation, a
    flag that changes matching, or a metacharacter right after `^` gives "",
    which every path starts with.
    """
    source = pattern.pattern
    flags = re.IGNORECASE | re.MULTILINE | re.VERBOSE
    # An alternation anywhere may hold a branch with another start.
    if not source.startswith("^") or "|" in source or pattern.flags & flags:
        return ""
    literal: list[str] = []
    for char in source[1:]:
        if char in _REGEX_SPECIAL:
            # A quantifier that allows zero repeats makes the last char optional.
            if char in "*?{" and literal:
                literal.pop()
            break
        literal.append(char)
    return "".join(literal)


def boundary_prefixes(path: str) -> Iterator[str]:
    """Yield every prefix that `prefix_matches` accepts for `path`, longest first."""
    yield path
    shortest = len(path)
    while True:
        slash = path.rfind("/", 0, shortest)
        if slash < 0:
            return
        # A run of slashes would give the same prefix twice.
        if slash + 1 < shortest:
            yield path[: slash + 1]
        if slash > 0:
            yield path[:slash]
        shortest = slash


class _PathTable:
    """Routes that share one host condition and priority, indexed by path."""

    __slots__ = ("any", "exact", "prefix", "regex")

    def __init__(self, routes: Iterable[Route]) -> None:
        exact: dict[str, list[Route]] = defaultdict(list)
        prefix: dict[str, list[Route]] = defaultdict(list)
        self.regex: list[tuple[str, re.Pattern[str], Route]] = []
        self.any: list[Route] = []
        for route in sorted(routes, key=rank_key):
            if route.path_kind == "exact":
                exact[route.path].append(route)
            elif route.path_kind == "prefix":
                prefix[route.path].append(route)
            elif route.path_kind == "regex" and route.path_regex is not None:
                pattern = route.path_regex
                self.regex.append((anchored_literal(pattern), pattern, route))
            else:
                self.any.append(route)
        self.exact = dict(exact)
        self.prefix = dict(prefix)

    def match(self, method: str, path: str, headers: Mapping[str, str]) -> Route | None:
        if self.exact:
            for route in self.exact.get(path, ()):
                if conditions_hold(route, method, headers):
                    return route
        if self.prefix:
            by_prefix = self._match_prefix(method, path, headers)
            if by_prefix is not None:
                return by_prefix
        # A path without a regex's anchored literal prefix skips the search.
        for literal, pattern, route in self.regex:
            if path.startswith(literal) and pattern.search(path):
                if conditions_hold(route, method, headers):
                    return route
        for route in self.any:
            if conditions_hold(route, method, headers):
                return route
        return None

    def _match_prefix(
        self, method: str, path: str, headers: Mapping[str, str]
    ) -> Route | None:
        # The prefixes of boundary_prefixes(path), longest first, in a loop:
        # compiled, a generator costs an object and a resume per prefix.
        route = _first_holding(self.prefix.get(path), method, headers)
        if route is not None:
            return route
        shortest = len(path)
        while True:
            slash = path.rfind("/", 0, shortest)
            if slash < 0:
                return None
            # A run of slashes would give the same prefix twice.
            if slash + 1 < shortest:
                routes = self.prefix.get(path[: slash + 1])
                route = _first_holding(routes, method, headers)
                if route is not None:
                    return route
            if slash > 0:
                route = _first_holding(self.prefix.get(path[:slash]), method, headers)
                if route is not None:
                    return route
            shortest = slash


def _first_holding(
    routes: list[Route] | None, method: str, headers: Mapping[str, str]
) -> Route | None:
    if routes is not None:
        for route in routes:
            if conditions_hold(route, method, headers):
                return route
    return None


class _HostTable:
    """Routes of one listener and one priority, indexed by host."""

    __slots__ = ("any", "exact", "wildcard")

    def __init__(self, routes: Iterable[Route]) -> None:
        by_host: dict[str | None, list[Route]] = defaultdict(list)
        for route in routes:
            by_host[route.host].append(route)
        any_host = by_host.pop(None, [])
        self.any = _PathTable(any_host) if any_host else None
        self.exact: dict[str, _PathTable] = {}
        # Keyed by the suffix with its leading dot: "*.example.com" -> ".example.com".
        self.wildcard: dict[str, _PathTable] = {}
        for host, host_routes in by_host.items():
            assert host is not None
            if host.startswith("*."):
                self.wildcard[host[1:]] = _PathTable(host_routes)
            else:
                self.exact[host] = _PathTable(host_routes)

    def match(
        self, method: str, host: str | None, path: str, headers: Mapping[str, str]
    ) -> Route | None:
        if host is not None:
            table = self.exact.get(host)
            if table is not None:
                route = table.match(method, path, headers)
                if route is not None:
                    return route
            if self.wildcard:
                route = self._match_wildcard(method, host, path, headers)
                if route is not None:
                    return route
        if self.any is not None:
            return self.any.match(method, path, headers)
        return None

    def _match_wildcard(
        self, method: str, host: str, path: str, headers: Mapping[str, str]
    ) -> Route | None:
        # Dots from the left give suffixes from the longest to the shortest;
        # a dot at position 0 would leave no label for the "*".
        dot = host.find(".", 1)
        while dot > 0:
            table = self.wildcard.get(host[dot:])
            if table is not None:
                route = table.match(method, path, headers)
                if route is not None:
                    return route
            dot = host.find(".", dot + 1)
        return None


class RouteTable:
    """The Router of a Graph: routes indexed per listener for fast matching."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        per_listener: dict[str, dict[int, list[Route]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for route in self.routes:
            for listener in route.listeners:
                per_listener[listener][route.priority].append(route)
        self._tables: dict[str, tuple[_HostTable, ...]] = {
            listener: tuple(
                _HostTable(levels[priority])
                for priority in sorted(levels, reverse=True)
            )
            for listener, levels in per_listener.items()
        }

    def __repr__(self) -> str:
        return f"<RouteTable routes={len(self.routes)} listeners={len(self._tables)}>"

    def __reduce__(self) -> tuple[type[RouteTable], tuple[tuple[Route, ...]]]:
        # Pickled as its routes, and indexed again when loaded: a class that
        # mypyc compiles has no instance __dict__ for pickle to restore.
        return (RouteTable, (self.routes,))

    def match(
        self,
        listener: str,
        method: str,
        host: str | None,
        path: str,
        headers: Mapping[str, str],
    ) -> Route | None:
        """Return the most specific route for a request, or None (404).

        `host` may carry a port and any case; `headers` maps lower-case
        names to values. An unknown listener matches no route.
        """
        levels = self._tables.get(listener)
        if levels is None:
            return None
        host = normalize_host(host)
        for table in levels:
            route = table.match(method, host, path, headers)
            if route is not None:
                return route
        return None


@dataclass(frozen=True, slots=True)
class RouteVerdict:
    """One route's outcome for a request: matched or not, and why."""

    route: Route
    matched: bool
    reason: str
    # The condition that failed: listener, host, path, method or header.
    failed: str | None = None


@dataclass(frozen=True, slots=True)
class MatchExplanation:
    """Every route ranked for a request, with the winner (None: no match)."""

    winner: Route | None
    verdicts: tuple[RouteVerdict, ...]


_RANK_REASONS = (
    "lower priority",
    "exact host beats wildcard host, and both beat no host",
    "a longer wildcard host is more specific",
    "exact path beats prefix, prefix beats regex, and all beat no path",
    "a longer prefix is more specific, and among regexes the earlier wins",
    "more method/header conditions are more specific",
    "earlier in the file",
)


def explain_match(
    routes: Sequence[Route],
    listener: str,
    method: str,
    host: str | None,
    path: str,
    headers: Mapping[str, str],
) -> MatchExplanation:
    """Rank every route for a request and give each one's verdict.

    The verdicts come in rank order. Every route before the winner failed a
    condition. A route after the winner either failed one too, or matched
    and lost on the first rank rule where it differs from the winner.
    """
    host = normalize_host(host)
    winner: Route | None = None
    verdicts = []
    for route in sorted(routes, key=rank_key):
        failure = _mismatch(route, listener, method, host, path, headers)
        if failure is not None:
            verdicts.append(RouteVerdict(route, False, failure[1], failure[0]))
        elif winner is None:
            winner = route
            verdicts.append(RouteVerdict(route, True, "matches"))
        else:
            verdicts.append(RouteVerdict(route, True, _lost_reason(route, winner)))
    return MatchExplanation(winner, tuple(verdicts))


def _lost_reason(route: Route, winner: Route) -> str:
    for rule, (mine, theirs) in enumerate(
        zip(rank_key(route), rank_key(winner), strict=True)
    ):
        if mine != theirs:
            return f"matches but loses to {winner.name}: {_RANK_REASONS[rule]}"
    return f"matches but loses to {winner.name}"


def mismatch_reason(
    route: Route,
    listener: str,
    method: str,
    host: str | None,
    path: str,
    headers: Mapping[str, str],
) -> str | None:
    """Return why a route does not match a request, or None when it does.

    `host` must already be normalised (see `normalize_host`).
    """
    failure = _mismatch(route, listener, method, host, path, headers)
    return None if failure is None else failure[1]


def _mismatch(
    route: Route,
    listener: str,
    method: str,
    host: str | None,
    path: str,
    headers: Mapping[str, str],
) -> tuple[str, str] | None:
    """Return (failed condition, reason), or None when the route matches."""
    if listener not in route.listeners:
        names = ", ".join(sorted(route.listeners)) or "none"
        return "listener", f"listener {listener} is not one of the route's ({names})"
    reason = _host_mismatch(route, host)
    if reason:
        return "host", reason
    reason = _path_mismatch(route, path)
    if reason:
        return "path", reason
    if route.methods is not None and method not in route.methods:
        allowed = ", ".join(sorted(route.methods))
        return "method", f"method {method} is not one of {allowed}"
    for name, value in route.headers:
        actual = headers.get(name)
        if actual is None:
            return "header", f'header {name} is missing (expected "{value}")'
        if actual != value:
            return "header", f'header {name} is "{actual}", expected "{value}"'
    return None


def _host_mismatch(route: Route, host: str | None) -> str | None:
    if route.host is None:
        return None
    if host is None:
        return f"the request has no host, the route requires {route.host}"
    if route.host.startswith("*."):
        if wildcard_matches(route.host, host):
            return None
    elif route.host == host:
        return None
    return f"host {host} does not match {route.host}"


def _path_mismatch(route: Route, path: str) -> str | None:
    kind = route.path_kind
    if kind == "exact" and path != route.path:
        return f"path {path} is not {route.path}"
    if kind == "prefix" and not prefix_matches(route.path, path):
        if path.startswith(route.path):
            return f"path {path} continues the prefix {route.path} mid-segment"
        return f"path {path} does not start with {route.path}"
    if kind == "regex":
        pattern = route.path_regex
        if pattern is None or pattern.search(path) is None:
            return f"path {path} does not match the regex {route.path}"
    return None
