"""Route matching: specificity rules, path prefixes, hosts, methods, headers."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

import pytest

from pgproxy.graph import routing
from pgproxy.graph.routing import (
    anchored_literal,
    boundary_prefixes,
    explain_match,
    normalize_host,
    prefix_matches,
)
from tests.graph.graphs import graph_of

Request = tuple[str, str | None, str]  # method, host, path


def _name(
    routes: list[dict[str, object]],
    request: Request,
    headers: Mapping[str, str] | None = None,
    listener: str = "public",
) -> str | None:
    graph = graph_of(routes)
    method, host, path = request
    route = graph.match(listener, method, host, path, headers or {})
    return None if route is None else route.name


SPECIFICITY_CASES = [
    pytest.param(
        [
            {"name": "any"},
            {"name": "wild", "host": "*.example.com"},
            {"name": "exact", "host": "api.example.com"},
        ],
        ("GET", "api.example.com", "/"),
        "exact",
        id="exact-host-beats-wildcard-and-any",
    ),
    pytest.param(
        [{"name": "any"}, {"name": "wild", "host": "*.example.com"}],
        ("GET", "www.example.com", "/"),
        "wild",
        id="wildcard-beats-any-host",
    ),
    pytest.param(
        [
            {"name": "short", "host": "*.example.com"},
            {"name": "long", "host": "*.eu.example.com"},
        ],
        ("GET", "a.eu.example.com", "/"),
        "long",
        id="longer-wildcard-suffix-first",
    ),
    pytest.param(
        [{"name": "any", "path": "/x"}, {"name": "host", "host": "a.example.com"}],
        ("GET", "a.example.com", "/x"),
        "host",
        id="host-rank-before-path-rank",
    ),
    pytest.param(
        [
            {"name": "none"},
            {"name": "regex", "path_regex": "^/a"},
            {"name": "prefix", "path_prefix": "/a"},
            {"name": "exact", "path": "/a/b"},
        ],
        ("GET", None, "/a/b"),
        "exact",
        id="exact-path-first",
    ),
    pytest.param(
        [
            {"name": "none"},
            {"name": "regex", "path_regex": "^/a"},
            {"name": "prefix", "path_prefix": "/a"},
        ],
        ("GET", None, "/a/b"),
        "prefix",
        id="prefix-beats-regex",
    ),
    pytest.param(
        [{"name": "none"}, {"name": "regex", "path_regex": "^/a"}],
        ("GET", None, "/a/b"),
        "regex",
        id="regex-beats-no-path",
    ),
    pytest.param(
        [
            {"name": "short", "path_prefix": "/a"},
            {"name": "long", "path_prefix": "/a/b"},
        ],
        ("GET", None, "/a/b/c"),
        "long",
        id="longest-prefix-wins",
    ),
    pytest.param(
        [
            {"name": "first", "path_regex": "^/a"},
            {"name": "second", "path_regex": "b$", "methods": ["GET"]},
        ],
        ("GET", None, "/a/b"),
        "first",
        id="regexes-in-file-order",
    ),
    pytest.param(
        [
            {"name": "plain", "path_prefix": "/a"},
            {"name": "canary", "path_prefix": "/a", "headers": {"X-Canary": "1"}},
        ],
        ("GET", None, "/a"),
        "canary",
        id="more-conditions-win",
    ),
    pytest.param(
        [
            {"name": "method", "path_prefix": "/a", "methods": ["GET"]},
            {
                "name": "two",
                "path_prefix": "/a",
                "methods": ["GET"],
                "headers": {"x-b": "1"},
            },
        ],
        ("GET", None, "/a"),
        "two",
        id="method-and-header-count",
    ),
    pytest.param(
        [
            {"name": "first", "path_prefix": "/a", "methods": ["GET"]},
            {"name": "second", "path_prefix": "/a", "headers": {"x-b": "1"}},
        ],
        ("GET", None, "/a"),
        "first",
        id="file-order-breaks-ties",
    ),
    pytest.param(
        [
            {"name": "exact", "host": "api.example.com", "path": "/a"},
            {"name": "catch-all", "priority": 10},
        ],
        ("GET", "api.example.com", "/a"),
        "catch-all",
        id="priority-overrides-specificity",
    ),
    pytest.param(
        [
            {"name": "low", "priority": -1, "host": "api.example.com"},
            {"name": "default"},
        ],
        ("GET", "api.example.com", "/"),
        "default",
        id="negative-priority-last",
    ),
]


# Cases whose winner depends on file order by design.
ORDER_DEPENDENT = {"regexes-in-file-order", "file-order-breaks-ties"}


@pytest.mark.parametrize(("routes", "request_", "expected"), SPECIFICITY_CASES)
def test_specificity(
    routes: list[dict[str, object]],
    request_: Request,
    expected: str,
    request: pytest.FixtureRequest,
) -> None:
    headers = {"x-canary": "1", "x-b": "1"}
    assert _name(routes, request_, headers) == expected
    if request.node.callspec.id not in ORDER_DEPENDENT:
        assert _name(list(reversed(routes)), request_, headers) == expected


def test_specificity_ignores_file_order() -> None:
    routes: list[dict[str, object]] = [
        {"name": "any"},
        {"name": "wild", "host": "*.example.com", "path_prefix": "/v1"},
        {"name": "exact", "host": "api.example.com", "path_prefix": "/v1"},
        {"name": "exact-long", "host": "api.example.com", "path_prefix": "/v1/users"},
    ]
    for order in (routes, list(reversed(routes)), routes[1:] + routes[:1]):
        assert _name(order, ("GET", "api.example.com", "/v1/users/7")) == "exact-long"
        assert _name(order, ("GET", "api.example.com", "/v1/orders")) == "exact"
        assert _name(order, ("GET", "x.example.com", "/v1/users")) == "wild"
        assert _name(order, ("GET", "x.example.com", "/v2")) == "any"


PREFIX_CASES = [
    ("/api", "/api", True),
    ("/api", "/api/", True),
    ("/api", "/api/x", True),
    ("/api", "/apix", False),
    ("/api", "/ap", False),
    ("/api/", "/api/", True),
    ("/api/", "/api/x", True),
    ("/api/", "/api", False),
    ("/", "/", True),
    ("/", "/anything", True),
    ("/a/b", "/a/b/c/d", True),
    ("/a/b", "/a/bc", False),
]


@pytest.mark.parametrize(("prefix", "path", "expected"), PREFIX_CASES)
def test_prefix_segment_boundary(prefix: str, path: str, expected: bool) -> None:
    assert prefix_matches(prefix, path) is expected
    matched = _name([{"name": "p", "path_prefix": prefix}], ("GET", None, path))
    assert (matched == "p") is expected


@pytest.mark.parametrize(
    "path", ["/", "/a", "/a/", "/a/b", "/a/b/", "//x", "/a//b", "/api/v1/users"]
)
def test_boundary_prefixes_agree(path: str) -> None:
    yielded = list(boundary_prefixes(path))
    expected = [
        path[:i] for i in range(len(path), 0, -1) if prefix_matches(path[:i], path)
    ]
    assert yielded == expected


HOST_CASES = [
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "aexample.com", False),
    ("*.example.com", "A.Example.COM", True),
    ("*.example.com", "a.example.com:8443", True),
    ("api.example.com", "API.example.com:80", True),
    ("api.example.com", "api.example.com.", True),
    ("api.example.com", "api.example.org", False),
    ("[::1]", "[::1]:8080", True),
    ("10.0.0.1", "10.0.0.1:80", True),
]


@pytest.mark.parametrize(("pattern", "host", "expected"), HOST_CASES)
def test_host_matching(pattern: str, host: str, expected: bool) -> None:
    matched = _name([{"name": "h", "host": pattern}], ("GET", host, "/"))
    assert (matched == "h") is expected


def test_normalize_host() -> None:
    assert normalize_host("Example.COM:8080") == "example.com"
    assert normalize_host("[::1]:8080") == "[::1]"
    assert normalize_host("[::1]") == "[::1]"
    assert normalize_host("") is None
    assert normalize_host(None) is None


def test_normalize_host_cached() -> None:
    for _ in range(2):  # the second round is returned from the cache
        assert normalize_host("Example.COM.:80") == "example.com"
        assert normalize_host(".") is None
        assert normalize_host("a:b:c") == "a:b"


def test_normalize_host_cache_bounded() -> None:
    for index in range(routing._MAX_CACHED_HOSTS + 10):
        assert normalize_host(f"h{index}.example:80") == f"h{index}.example"
    long_host = "a" * (routing._MAX_CACHED_HOST + 1)

    assert normalize_host(long_host) == long_host
    assert len(routing._NORMALIZED_HOSTS) <= routing._MAX_CACHED_HOSTS
    assert long_host not in routing._NORMALIZED_HOSTS


def test_request_without_host() -> None:
    routes: list[dict[str, object]] = [{"name": "h", "host": "a.example.com"}]
    assert _name(routes, ("GET", None, "/")) is None
    assert _name([*routes, {"name": "any"}], ("GET", None, "/")) == "any"


def test_methods_condition() -> None:
    routes: list[dict[str, object]] = [{"name": "write", "methods": ["post", "PUT"]}]
    assert _name(routes, ("POST", None, "/")) == "write"
    assert _name(routes, ("PUT", None, "/")) == "write"
    assert _name(routes, ("GET", None, "/")) is None


def test_headers_condition() -> None:
    routes: list[dict[str, object]] = [
        {"name": "canary", "headers": {"X-Canary": "1", "x-team": "blue"}},
        {"name": "stable"},
    ]
    both = {"x-canary": "1", "x-team": "blue"}
    assert _name(routes, ("GET", None, "/"), both) == "canary"
    assert _name(routes, ("GET", None, "/"), {"x-canary": "1"}) == "stable"
    assert _name(routes, ("GET", None, "/"), {**both, "x-canary": "2"}) == "stable"


def test_listener_condition() -> None:
    routes: list[dict[str, object]] = [
        {"name": "admin", "listeners": ["internal"], "path_prefix": "/admin"},
        {"name": "everywhere"},
    ]
    assert _name(routes, ("GET", None, "/admin"), listener="internal") == "admin"
    assert _name(routes, ("GET", None, "/admin"), listener="public") == "everywhere"
    assert _name(routes, ("GET", None, "/admin"), listener="missing") is None


def test_exact_path_is_exact() -> None:
    routes: list[dict[str, object]] = [{"name": "e", "path": "/health"}]
    assert _name(routes, ("GET", None, "/health")) == "e"
    assert _name(routes, ("GET", None, "/health/")) is None
    assert _name(routes, ("GET", None, "/healthz")) is None


def test_regex_is_searched() -> None:
    routes: list[dict[str, object]] = [{"name": "r", "path_regex": "/v[0-9]+/"}]
    assert _name(routes, ("GET", None, "/api/v2/x")) == "r"
    assert _name(routes, ("GET", None, "/api/vx/")) is None


def test_no_route_matches() -> None:
    assert _name([{"name": "p", "path_prefix": "/a"}], ("GET", None, "/b")) is None


def test_priority_levels_fall_through() -> None:
    routes: list[dict[str, object]] = [
        {"name": "high", "priority": 5, "path_prefix": "/a"},
        {"name": "low", "host": "x.example.com"},
    ]
    assert _name(routes, ("GET", "x.example.com", "/a")) == "high"
    assert _name(routes, ("GET", "x.example.com", "/b")) == "low"


def test_explain_reasons() -> None:
    graph = graph_of(
        [
            {"name": "exact", "host": "api.example.com", "path": "/v1"},
            {"name": "wrong-method", "host": "api.example.com", "methods": ["POST"]},
            {"name": "apix", "path_prefix": "/v1x"},
            {"name": "winner", "path_prefix": "/v1"},
            {"name": "loser"},
        ]
    )
    result = explain_match(
        graph.routes, "public", "GET", "api.example.com", "/v1/x", {}
    )
    assert result.winner is not None
    assert result.winner.name == "winner"
    reasons = {v.route.name: v.reason for v in result.verdicts}
    assert reasons["exact"] == "path /v1/x is not /v1"
    assert reasons["wrong-method"] == "method GET is not one of POST"
    assert reasons["apix"] == "path /v1/x does not start with /v1x"
    assert reasons["winner"] == "matches"
    assert reasons["loser"].startswith("matches but loses to winner")
    assert [v.route.name for v in result.verdicts][:2] == ["exact", "wrong-method"]


def test_explain_mid_segment_reason() -> None:
    graph = graph_of([{"name": "api", "path_prefix": "/api"}])
    result = explain_match(graph.routes, "public", "GET", None, "/apix", {})
    assert result.winner is None
    assert (
        result.verdicts[0].reason == "path /apix continues the prefix /api mid-segment"
    )


def _random_route(rng: random.Random, index: int) -> dict[str, object]:
    route: dict[str, object] = {"name": f"r{index}"}
    host = rng.choice(
        [None, "a.example.com", "b.example.com", "*.example.com", "*.a.example.com"]
    )
    if host:
        route["host"] = host
    kind = rng.choice(["none", "path", "path_prefix", "path_regex"])
    if kind == "path":
        route["path"] = rng.choice(["/", "/a", "/a/b", "/b"])
    elif kind == "path_prefix":
        route["path_prefix"] = rng.choice(["/", "/a", "/a/", "/a/b", "/b"])
    elif kind == "path_regex":
        route["path_regex"] = rng.choice(["^/a", "b$", "^/[ab]/"])
    if rng.random() < 0.3:
        route["methods"] = rng.sample(["GET", "POST", "PUT"], rng.randint(1, 2))
    if rng.random() < 0.3:
        route["headers"] = {"x-v": rng.choice(["1", "2"])}
    if rng.random() < 0.2:
        route["priority"] = rng.randint(-1, 2)
    if rng.random() < 0.2:
        route["listeners"] = ["internal"]
    return route


def test_index_agrees_with_linear_ranking() -> None:
    rng = random.Random(20240601)
    hosts = [None, "a.example.com", "x.a.example.com", "b.example.com", "example.com"]
    paths = ["/", "/a", "/a/", "/a/b", "/a/bc", "/b", "/b/a/b", "/ab"]
    for table in range(40):
        routes = [_random_route(rng, i) for i in range(rng.randint(1, 25))]
        graph = graph_of(routes)
        for _ in range(60):
            listener = rng.choice(["public", "internal"])
            method = rng.choice(["GET", "POST", "PUT"])
            host = rng.choice(hosts)
            path = rng.choice(paths)
            headers = rng.choice([{}, {"x-v": "1"}, {"x-v": "2"}])
            indexed = graph.match(listener, method, host, path, headers)
            linear = explain_match(graph.routes, listener, method, host, path, headers)
            assert indexed is linear.winner, (table, listener, method, host, path)


@pytest.mark.parametrize(
    ("regex", "literal"),
    [
        ("^/api/v[0-9]+", "/api/v"),
        ("^/users/7/[0-9]+$", "/users/7/"),
        ("^/ab?c", "/a"),
        ("^/ab*c", "/a"),
        ("^/ab{0,2}", "/a"),
        ("^/a+b", "/a"),
        ("^/a\\.b", "/a"),
        ("^/a|^/b", ""),
        ("(?i)^/A", ""),
        ("/x", ""),
        ("^(/a)", ""),
    ],
)
def test_anchored_literal(regex: str, literal: str) -> None:
    assert anchored_literal(re.compile(regex)) == literal


def test_regex_literal_prefix_keeps_matches() -> None:
    routes: list[dict[str, object]] = [
        {"name": "dot", "path_regex": "^/a\\.b"},
        {"name": "either", "path_regex": "^/x|^/y"},
        {"name": "optional", "path_regex": "^/ab?c"},
    ]
    assert _name(routes, ("GET", None, "/a.b/c")) == "dot"
    assert _name(routes, ("GET", None, "/y/1")) == "either"
    assert _name(routes, ("GET", None, "/ac")) == "optional"
    assert _name(routes, ("GET", None, "/axb")) is None
