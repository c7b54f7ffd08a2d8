"""Graph building: normalised routes and every semantic diagnostic code."""

from __future__ import annotations

import pytest

from pgproxy.config.diagnostics import Severity
from pgproxy.graph.types import Graph
from tests.graph.graphs import BASE, check, graph_of, routes_toml

LISTENER = '[listeners.public]\naddress = "127.0.0.1:8080"\n'
ROUTE = '[[routes]]\ncluster = "c"\n'
CLUSTER = '[clusters.c]\nendpoints = ["127.0.0.1:9001"]\n'


def _codes(text: str) -> list[tuple[str, str, Severity]]:
    _, diagnostics = check(text)
    return [(d.code, d.key, d.severity) for d in diagnostics]


def test_route_fields_normalised() -> None:
    graph = graph_of(
        [
            {
                "host": "API.Example.com",
                "path_regex": "^/v[0-9]+/",
                "methods": ["get", "Post"],
                "headers": {"X-Canary": "1"},
                "retry_on": ["connect-failure", 503],
            },
            {"name": "wild", "host": "*.Example.com", "path_prefix": "/api"},
            {"path": "/ping", "respond": {"status": 200, "body": "pong"}},
        ]
    )
    first, wild, ping = graph.routes
    assert first.name == "routes[0]"
    assert first.host == "api.example.com"
    assert first.path_kind == "regex"
    assert first.path_regex is not None and first.path_regex.search("/v2/x")
    assert first.methods == frozenset({"GET", "POST"})
    assert first.headers == (("x-canary", "1"),)
    assert first.retry_on == frozenset({"connect-failure", 503})
    assert first.listeners == frozenset({"public", "internal"})
    assert wild.host == "*.example.com"
    assert wild.path_kind == "prefix"
    assert wild.path == "/api"
    assert ping.path_kind == "exact"
    assert ping.cluster is None
    assert ping.respond is not None and ping.respond.body == "pong"


def test_graph_contents() -> None:
    graph = graph_of([{"name": "all"}])
    assert isinstance(graph, Graph)
    assert graph.source == "test.toml"
    assert graph.listeners["public"].port == 8080
    assert graph.listeners["internal"].host == "127.0.0.1"
    (endpoint,) = graph.clusters["c"].endpoints
    assert (endpoint.host, endpoint.port, endpoint.weight) == ("127.0.0.1", 9001, 1)
    assert endpoint.cluster == "c"
    with pytest.raises(TypeError):
        graph.clusters["d"] = graph.clusters["c"]  # type: ignore[index]


def test_endpoint_forms() -> None:
    base = (
        LISTENER
        + ROUTE
        + (
            '[clusters.c]\nendpoints = ["https://api.internal:8443", "[::1]:8000", '
            '{ address = "10.0.0.1:80", weight = 3 }]\n'
            '[clusters.c.health_check]\npath = "/healthz"\n'
        )
    )
    graph, diagnostics = check(base)
    assert graph is not None, diagnostics
    tls, v6, weighted = graph.clusters["c"].endpoints
    assert (tls.tls, tls.host, tls.port) == (True, "api.internal", 8443)
    assert (v6.host, v6.port, v6.address) == ("::1", 8000, "[::1]:8000")
    assert weighted.weight == 3


DIAGNOSTIC_CASES = [
    pytest.param(
        LISTENER + ROUTE.replace('"c"', '"cc"') + CLUSTER,
        ("unknown-cluster", "routes[0].cluster", Severity.ERROR),
        id="unknown-cluster",
    ),
    pytest.param(
        LISTENER + ROUTE + 'listeners = ["pubic"]\n' + CLUSTER,
        ("unknown-listener", "routes[0].listeners[0]", Severity.ERROR),
        id="unknown-listener",
    ),
    pytest.param(
        LISTENER + '[listeners.b]\naddress = "127.0.0.1:8080"\n' + ROUTE + CLUSTER,
        ("duplicate-listener-address", "listeners.b.address", Severity.ERROR),
        id="duplicate-address",
    ),
    pytest.param(
        '[listeners.a]\naddress = "0.0.0.0:80"\n'
        '[listeners.b]\naddress = "10.1.1.1:80"\n' + ROUTE + CLUSTER,
        ("duplicate-listener-address", "listeners.b.address", Severity.ERROR),
        id="wildcard-and-specific-address",
    ),
    pytest.param(
        '[listeners.a]\naddress = "[::]:80"\n[listeners.b]\naddress = "[::1]:80"\n'
        + ROUTE
        + CLUSTER,
        ("duplicate-listener-address", "listeners.b.address", Severity.ERROR),
        id="ipv6-wildcard-and-specific",
    ),
    pytest.param(
        '[server]\nadmin = "127.0.0.1:8080"\n' + LISTENER + ROUTE + CLUSTER,
        ("duplicate-listener-address", "listeners.public.address", Severity.ERROR),
        id="listener-on-admin-address",
    ),
    pytest.param(
        LISTENER + ROUTE + 'path_regex = "([a-"\n' + CLUSTER,
        ("invalid-regex", "routes[0].path_regex", Severity.ERROR),
        id="invalid-regex",
    ),
    pytest.param(
        LISTENER
        + ROUTE
        + 'path_regex = "'
        + "(a|" * 500
        + "a"
        + ")" * 500
        + '"\n'
        + CLUSTER,
        ("invalid-regex", "routes[0].path_regex", Severity.ERROR),
        id="regex-nested-too-deeply",
    ),
    pytest.param(
        LISTENER + ROUTE + 'path_regex = "^/x{99999999999999999}"\n' + CLUSTER,
        ("invalid-regex", "routes[0].path_regex", Severity.ERROR),
        id="regex-repeat-count-overflow",
    ),
    pytest.param(
        LISTENER + ROUTE + 'path_regex = "^/(a+)+$"\n' + CLUSTER,
        ("regex-backtracking", "routes[0].path_regex", Severity.WARNING),
        id="regex-backtracking",
    ),
    pytest.param(
        LISTENER + ROUTE + 'host = "api.example.com:8080"\n' + CLUSTER,
        ("invalid-host", "routes[0].host", Severity.ERROR),
        id="host-with-port",
    ),
    pytest.param(
        LISTENER + ROUTE + 'host = "api.example.com\\n"\n' + CLUSTER,
        ("invalid-host", "routes[0].host", Severity.ERROR),
        id="host-with-final-newline",
    ),
    pytest.param(
        LISTENER + ROUTE + 'host = "api.*.com"\n' + CLUSTER,
        ("invalid-host", "routes[0].host", Severity.ERROR),
        id="misplaced-wildcard",
    ),
    pytest.param(
        LISTENER + ROUTE + CLUSTER + 'balancer = "consistent_hash"\n',
        ("missing-hash-key", "clusters.c.balancer", Severity.ERROR),
        id="missing-hash-key",
    ),
    pytest.param(
        LISTENER + ROUTE + CLUSTER + 'hash_key = "path"\n',
        ("unused-hash-key", "clusters.c.hash_key", Severity.WARNING),
        id="unused-hash-key",
    ),
    pytest.param(
        LISTENER + ROUTE + CLUSTER + '[clusters.c.health_check]\ninterval = "2s"\n',
        (
            "health-timeout-not-below-interval",
            "clusters.c.health_check.timeout",
            Severity.ERROR,
        ),
        id="default-timeout-equals-interval",
    ),
    pytest.param(
        LISTENER + ROUTE + CLUSTER.replace('"127.0.0.1:9001"', '"a:1", "b:1"'),
        ("no-health-check", "clusters.c", Severity.WARNING),
        id="no-health-check",
    ),
    pytest.param(
        LISTENER + ROUTE + "[clusters.c]\nendpoints = []\n",
        ("empty-cluster", "clusters.c.endpoints", Severity.ERROR),
        id="empty-cluster",
    ),
    pytest.param(
        LISTENER
        + ROUTE
        + '[clusters.c]\nendpoints = ["A.internal:80", "a.internal:80"]\n'
        + "[clusters.c.health_check]\n",
        ("duplicate-endpoint", "clusters.c.endpoints[1]", Severity.ERROR),
        id="duplicate-endpoint",
    ),
    pytest.param(
        LISTENER + ROUTE + CLUSTER + '[clusters.spare]\nendpoints = ["127.0.0.1:1"]\n',
        ("unused-cluster", "clusters.spare", Severity.WARNING),
        id="unused-cluster",
    ),
    pytest.param(
        LISTENER
        + '[listeners.quiet]\naddress = "127.0.0.1:8081"\n'
        + ROUTE
        + 'listeners = ["public"]\n'
        + CLUSTER,
        ("listener-without-routes", "listeners.quiet", Severity.WARNING),
        id="listener-without-routes",
    ),
    pytest.param(
        LISTENER
        + ROUTE
        + 'name = "a"\n'
        + ROUTE
        + 'name = "a"\npath = "/x"\n'
        + CLUSTER,
        ("duplicate-route-name", "routes[1].name", Severity.ERROR),
        id="duplicate-route-name",
    ),
    pytest.param(
        LISTENER + ROUTE + 'path = "/x"\n' + ROUTE + 'name = "routes[0]"\n' + CLUSTER,
        ("duplicate-route-name", "routes[1].name", Severity.ERROR),
        id="name-equals-default-name",
    ),
    pytest.param(
        '[server]\ntrusted_proxies = ["10.0.0.0/8", "::/0"]\n'
        + LISTENER
        + ROUTE
        + CLUSTER,
        ("trusted-proxies-everyone", "server.trusted_proxies[1]", Severity.WARNING),
        id="trust-everyone",
    ),
    pytest.param(
        "[listeners]\n" + ROUTE + CLUSTER,
        ("no-listeners", "listeners", Severity.ERROR),
        id="no-listeners",
    ),
    pytest.param(
        LISTENER + ROUTE + 'path_prefix = "/"\n' + ROUTE + 'path_prefix = "/a"\n'
        "priority = -1\n" + CLUSTER,
        ("shadowed-route", "routes[1]", Severity.WARNING),
        id="shadowed-by-priority",
    ),
]


@pytest.mark.parametrize(("text", "expected"), DIAGNOSTIC_CASES)
def test_diagnostic(text: str, expected: tuple[str, str, Severity]) -> None:
    found = _codes(text)
    assert expected in found
    graph, _ = check(text)
    assert (graph is None) is (expected[2] is Severity.ERROR)


def test_valid_config_has_no_diagnostics() -> None:
    assert _codes(LISTENER + ROUTE + CLUSTER) == []


def test_port_zero_listeners_do_not_clash() -> None:
    text = (
        '[listeners.a]\naddress = "127.0.0.1:0"\n'
        '[listeners.b]\naddress = "127.0.0.1:0"\n'
    )
    assert _codes(text + ROUTE + CLUSTER) == []


def test_ipv4_and_ipv6_wildcards_coexist() -> None:
    text = '[listeners.a]\naddress = "0.0.0.0:80"\n[listeners.b]\naddress = "[::]:80"\n'
    assert _codes(text + ROUTE + CLUSTER) == []


def test_unknown_cluster_hints() -> None:
    _, diagnostics = check(LISTENER + ROUTE.replace('"c"', '"cc"') + CLUSTER)
    unknown = next(d for d in diagnostics if d.code == "unknown-cluster")
    # Positions are filled later, from the source map.
    assert (unknown.file, unknown.line, unknown.column) == ("test.toml", 0, 0)
    assert unknown.hint == 'did you mean "c"?'
    _, diagnostics = check(LISTENER + ROUTE.replace('"c"', '"zzz"') + CLUSTER)
    unknown = next(d for d in diagnostics if d.code == "unknown-cluster")
    assert unknown.hint == "defined: c"


def test_quoted_cluster_name_in_key_path() -> None:
    text = (
        LISTENER
        + '[[routes]]\ncluster = "api.v1"\n'
        + ('[clusters."api.v1"]\nendpoints = ["a:1", "b:1"]\n')
    )
    assert ("no-health-check", 'clusters."api.v1"', Severity.WARNING) in _codes(text)


SHADOW_CASES = [
    pytest.param(
        [{"name": "a", "path_prefix": "/api"}, {"name": "b", "path_prefix": "/api"}],
        "b",
        "a",
        "it comes earlier in the file",
        id="duplicate-later-in-file",
    ),
    pytest.param(
        [
            {"name": "a", "path_prefix": "/api", "priority": 1},
            {"name": "b", "host": "x.example.com", "path": "/api/users"},
        ],
        "b",
        "a",
        "it has a higher priority",
        id="priority-over-more-specific",
    ),
    pytest.param(
        [
            {"name": "a", "host": "*.example.com", "priority": 1},
            {"name": "b", "host": "*.eu.example.com", "methods": ["GET"]},
        ],
        "b",
        "a",
        "it has a higher priority",
        id="wildcard-covers-longer-wildcard",
    ),
    pytest.param(
        [
            {"name": "a", "path_regex": "^/x"},
            {"name": "b", "path_regex": "^/x", "headers": {"x-a": "1"}},
        ],
        "b",
        "a",
        "among regexes",
        id="same-regex-earlier",
    ),
    pytest.param(
        [
            {"name": "a", "path": "/x", "methods": ["GET", "POST"]},
            {"name": "b", "path": "/x", "methods": ["GET"]},
        ],
        "b",
        "a",
        "earlier in the file",
        id="methods-subset",
    ),
]


@pytest.mark.parametrize(("routes", "shadowed", "winner", "reason"), SHADOW_CASES)
def test_shadowed_route(
    routes: list[dict[str, object]], shadowed: str, winner: str, reason: str
) -> None:
    _, diagnostics = check(BASE + routes_toml(routes))
    found = [d for d in diagnostics if d.code == "shadowed-route"]
    assert len(found) == 1
    assert f'route "{shadowed}" can never match' in found[0].message
    assert f'route "{winner}"' in found[0].message
    assert reason in found[0].message


NOT_SHADOWED = [
    pytest.param(
        [{"path_prefix": "/api"}, {"path_prefix": "/api", "methods": ["GET"]}],
        id="more-conditions-rank-first",
    ),
    pytest.param(
        [{"path_prefix": "/api"}, {"path_prefix": "/apix"}], id="not-on-boundary"
    ),
    pytest.param(
        [{"path_prefix": "/api", "listeners": ["public"]}, {"path_prefix": "/api"}],
        id="fewer-listeners",
    ),
    pytest.param([{"path_regex": "^/"}, {"path_regex": "^/x"}], id="different-regexes"),
    pytest.param(
        [{"path_prefix": "/a", "headers": {"x-a": "1"}}, {"path_prefix": "/a/b"}],
        id="header-not-on-later",
    ),
    pytest.param(
        [{"host": "*.example.com", "priority": 1}, {"host": "example.com"}],
        id="wildcard-misses-apex",
    ),
]


@pytest.mark.parametrize("routes", NOT_SHADOWED)
def test_not_shadowed(routes: list[dict[str, object]]) -> None:
    _, diagnostics = check(BASE + routes_toml(routes))
    assert [d.message for d in diagnostics if d.code == "shadowed-route"] == []


def test_shadow_check_scales() -> None:
    routes: list[dict[str, object]] = [
        {"host": f"h{i % 50}.example.com", "path_prefix": f"/p{i}"} for i in range(2000)
    ]
    routes.append({"host": "h1.example.com", "path": "/p1/x", "priority": -1})
    _, diagnostics = check(BASE + routes_toml(routes))
    shadowed = [d for d in diagnostics if d.code == "shadowed-route"]
    assert [d.key for d in shadowed] == ["routes[2000]"]


@pytest.mark.parametrize(
    ("admin", "warned"),
    [
        ("0.0.0.0:9901", True),
        ("[::]:9901", True),
        ("10.1.2.3:9901", True),
        ("127.0.0.1:9901", False),
        ("127.0.0.2:9901", False),
        ("[::1]:9901", False),
        ("localhost:9901", False),
    ],
)
def test_admin_not_loopback_warning(admin: str, warned: bool) -> None:
    text = f'[server]\nadmin = "{admin}"\n' + LISTENER + ROUTE + CLUSTER
    expected = ("admin-not-loopback", "server.admin", Severity.WARNING)

    assert (expected in _codes(text)) is warned
