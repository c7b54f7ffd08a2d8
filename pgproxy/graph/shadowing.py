"""Shadowed routes: routes that no request can ever reach.

Route B is shadowed by route A when A ranks ahead of B (see
`pgproxy.graph.routing.rank_key`) and every request that B matches is also
matched by A: A applies on every listener B does, A's host covers B's, A's
path condition covers B's, A allows every method B allows and A's header
conditions are a subset of B's. A regex covers another route's path only
when both patterns are the same text, because regex containment is not
decided here; a shadow hidden behind different regexes is not reported.

The search looks only at routes that could cover B (same host, a covering
wildcard or no host; same exact path, a covering prefix, the same regex or
no path), so it stays near-linear on a table of thousands of routes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pgproxy.graph.routing import (
    boundary_prefixes,
    prefix_matches,
    rank_key,
    wildcard_matches,
)
from pgproxy.graph.types import Route

_RANK_WORDS = (
    "it has a higher priority",
    "an exact host ranks before a wildcard host, and both before no host",
    "its wildcard host is longer",
    "an exact path ranks before a prefix, a prefix before a regex, and all "
    "before no path",
    "its prefix is longer or, among regexes, it comes first in the file",
    "it has more method/header conditions",
    "it comes earlier in the file",
)


def covers(first: Route, second: Route) -> bool:
    """Return whether `first` matches every request that `second` matches."""
    if not second.listeners <= first.listeners:
        return False
    if not _host_covers(first.host, second.host):
        return False
    if not _path_covers(first, second):
        return False
    if first.methods is not None and (
        second.methods is None or not second.methods <= first.methods
    ):
        return False
    return set(first.headers) <= set(second.headers)


def shadow_reason(winner: Route, shadowed: Route) -> str:
    """Return the rank rule that puts `winner` ahead of `shadowed`."""
    for rule, (mine, theirs) in enumerate(
        zip(rank_key(winner), rank_key(shadowed), strict=True)
    ):
        if mine != theirs:
            return _RANK_WORDS[rule]
    return _RANK_WORDS[-1]


def _host_covers(first: str | None, second: str | None) -> bool:
    if first is None or first == second:
        return True
    if second is None or not first.startswith("*."):
        return False
    if second.startswith("*."):
        return second[1:].endswith(first[1:])
    return wildcard_matches(first, second)


def _path_covers(first: Route, second: Route) -> bool:
    if first.path_kind == "any":
        return True
    if first.path_kind == "exact":
        return second.path_kind == "exact" and second.path == first.path
    if first.path_kind == "prefix":
        return second.path_kind in ("exact", "prefix") and prefix_matches(
            first.path, second.path
        )
    return second.path_kind == "regex" and second.path == first.path


@dataclass
class _Group:
    """Routes with one host condition, indexed by path condition."""

    any: list[Route] = field(default_factory=list)
    exact: dict[str, list[Route]] = field(default_factory=lambda: defaultdict(list))
    prefix: dict[str, list[Route]] = field(default_factory=lambda: defaultdict(list))
    regex: dict[str, list[Route]] = field(default_factory=lambda: defaultdict(list))

    def add(self, route: Route) -> None:
        if route.path_kind == "any":
            self.any.append(route)
        else:
            getattr(self, route.path_kind)[route.path].append(route)

    def covering(self, route: Route) -> Iterator[Route]:
        yield from self.any
        if route.path_kind == "exact":
            yield from self.exact.get(route.path, ())
        if route.path_kind in ("exact", "prefix"):
            for prefix in boundary_prefixes(route.path):
                yield from self.prefix.get(prefix, ())
        if route.path_kind == "regex":
            yield from self.regex.get(route.path, ())


def find_shadowed(routes: Sequence[Route]) -> list[tuple[Route, Route]]:
    """Return (shadowed, winner) pairs, naming the best-ranked winner of each."""
    groups: dict[str | None, _Group] = defaultdict(_Group)
    for route in routes:
        if route.path_kind != "regex" or route.path_regex is not None:
            groups[route.host].add(route)

    pairs = []
    for route in routes:
        best: Route | None = None
        for host in _covering_hosts(route.host):
            group = groups.get(host)
            if group is None:
                continue
            for candidate in group.covering(route):
                if candidate is route or rank_key(candidate) >= rank_key(route):
                    continue
                if covers(candidate, route) and (
                    best is None or rank_key(candidate) < rank_key(best)
                ):
                    best = candidate
        if best is not None:
            pairs.append((route, best))
    return pairs


def _covering_hosts(host: str | None) -> Iterator[str | None]:
    """Yield the host conditions that may cover `host`, the route's own first."""
    if host is not None:
        yield host
        # "a.b.example.com" and "*.b.example.com" are both covered by
        # "*.example.com" and "*.com".
        bare = host[2:] if host.startswith("*.") else host
        dot = bare.find(".", 1)
        while dot > 0:
            yield "*" + bare[dot:]
            dot = bare.find(".", dot + 1)
    yield None
