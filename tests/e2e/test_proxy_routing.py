"""Routing through a real pgproxy process: host, path, method and header rules.

One pgproxy process serves the whole module. Three single-endpoint clusters
(a, b, c) echo the request, so the `upstream` field of the echo shows which
route was taken.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_client import RawConnection, build_request, echo_of, echoed_header, request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"

[listeners.other]
address = "127.0.0.1:0"

[[routes]]
name = "respond"
path = "/respond"
respond = {{ status = 202, body = "accepted here", headers = {{ x-respond = "yes" }} }}

[[routes]]
name = "host-exact"
host = "api.example.com"
cluster = "b"

[[routes]]
name = "host-wildcard"
host = "*.example.com"
cluster = "c"

[[routes]]
name = "prefix-api"
path_prefix = "/api"
cluster = "b"

[[routes]]
name = "prefix-slash"
path_prefix = "/docs/"
cluster = "c"

[[routes]]
name = "strip"
path_prefix = "/strip"
strip_prefix = true
cluster = "a"

[[routes]]
name = "exact"
path = "/exact"
cluster = "c"

[[routes]]
name = "regex"
path_regex = "^/v[0-9]+/items$"
cluster = "c"

[[routes]]
name = "methods"
path_prefix = "/methods"
methods = ["POST", "PUT"]
cluster = "b"

[[routes]]
name = "canary"
path_prefix = "/canary"
headers = {{ x-canary = "1" }}
cluster = "c"

[[routes]]
name = "canary-fallback"
path_prefix = "/canary"
cluster = "a"

[[routes]]
name = "longer-prefix"
path_prefix = "/shop/cart"
cluster = "c"

[[routes]]
name = "shorter-prefix"
path_prefix = "/shop"
cluster = "b"

[[routes]]
name = "prio-prefix"
path_prefix = "/prio"
cluster = "b"

[[routes]]
name = "prio-regex"
path_regex = "^/prio"
priority = 10
cluster = "c"

[[routes]]
name = "other-only"
path = "/other-only"
listeners = ["other"]
cluster = "a"

[clusters.a]
endpoints = ["{a}"]

[clusters.b]
endpoints = ["{b}"]

[clusters.c]
endpoints = ["{c}"]
"""


@pytest.fixture(scope="module")
def upstreams(module_upstream_factory: UpstreamFactory) -> dict[str, Upstream]:
    return {name: module_upstream_factory(name) for name in "abc"}


@pytest.fixture(scope="module")
def proxy(
    module_pgproxy_factory: PgproxyFactory, upstreams: dict[str, Upstream]
) -> PgproxyProcess:
    addresses = {name: upstream.address for name, upstream in upstreams.items()}
    return module_pgproxy_factory(CONFIG.format(**addresses))


@pytest.fixture(autouse=True)
def fresh_upstreams(upstreams: dict[str, Upstream]) -> Iterator[None]:
    for upstream in upstreams.values():
        upstream.reset()
    yield


def routed_to(
    proxy: PgproxyProcess,
    target: str,
    host: str = "test.local",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
) -> str:
    """Send a request and return the name of the upstream that served it."""
    body = b"x" if method in ("POST", "PUT") else None
    document = echo_of(
        request(proxy.port(), method, target, headers=headers, body=body, host=host)
    )
    upstream: str = document["upstream"]
    return upstream


def assert_no_route(
    proxy: PgproxyProcess,
    upstreams: dict[str, Upstream],
    target: str,
    host: str = "test.local",
    method: str = "GET",
) -> None:
    response = request(proxy.port(), method, target, host=host)
    assert response.status == 404, (
        f"{method} {target} (Host {host}) should match no route:\n{response.describe()}"
    )
    assert (response.header("content-type") or "").startswith("text/plain"), (
        response.describe()
    )
    assert response.body, "a 404 from pgproxy should carry a short body"
    for upstream in upstreams.values():
        seen = [
            r.target
            for r in upstream.requests
            if r.target == target and r.method == method
        ]
        assert seen == [], f"upstream {upstream.name} saw {target} despite no route"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/api", "b"),
        ("/api/", "b"),
        ("/api/users?id=1", "b"),
        ("/docs/", "c"),
        ("/docs/x", "c"),
    ],
)
def test_prefix_matches_segments(
    proxy: PgproxyProcess, target: str, expected: str
) -> None:
    assert routed_to(proxy, target) == expected


@pytest.mark.parametrize("target", ["/apix", "/apix/y", "/docs", "/nothing"])
def test_prefix_not_on_boundary_is_404(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream], target: str
) -> None:
    assert_no_route(proxy, upstreams, target)


def test_exact_path(proxy: PgproxyProcess, upstreams: dict[str, Upstream]) -> None:
    assert routed_to(proxy, "/exact") == "c"
    assert routed_to(proxy, "/exact?query=1") == "c", (
        "the query string is not part of the path"
    )
    assert_no_route(proxy, upstreams, "/exact/more")


def test_regex_path(proxy: PgproxyProcess, upstreams: dict[str, Upstream]) -> None:
    assert routed_to(proxy, "/v1/items") == "c"
    assert routed_to(proxy, "/v22/items") == "c"
    assert_no_route(proxy, upstreams, "/vx/items")
    assert_no_route(proxy, upstreams, "/v1/items/9")


def test_exact_host_beats_wildcard(proxy: PgproxyProcess) -> None:
    assert routed_to(proxy, "/exact", host="api.example.com") == "b"
    assert routed_to(proxy, "/anything", host="www.example.com") == "c"
    assert routed_to(proxy, "/anything", host="a.b.example.com") == "c"


def test_host_ignores_case_and_port(proxy: PgproxyProcess) -> None:
    assert routed_to(proxy, "/z", host="API.Example.COM") == "b"
    assert routed_to(proxy, "/z", host="api.example.com:8080") == "b"


def test_wildcard_excludes_apex(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    assert_no_route(proxy, upstreams, "/zzz", host="example.com")


def test_longest_prefix_wins(proxy: PgproxyProcess) -> None:
    assert routed_to(proxy, "/shop/cart/1") == "c"
    assert routed_to(proxy, "/shop/cartx") == "b"
    assert routed_to(proxy, "/shop") == "b"


def test_priority_beats_specificity(proxy: PgproxyProcess) -> None:
    assert routed_to(proxy, "/prio/x") == "c"


def test_methods(proxy: PgproxyProcess, upstreams: dict[str, Upstream]) -> None:
    assert routed_to(proxy, "/methods/x", method="POST") == "b"
    assert routed_to(proxy, "/methods/x", method="PUT") == "b"
    assert_no_route(proxy, upstreams, "/methods/x", method="GET")
    assert_no_route(proxy, upstreams, "/methods/x", method="DELETE")


def test_header_condition(proxy: PgproxyProcess) -> None:
    assert routed_to(proxy, "/canary/x", headers=[("X-Canary", "1")]) == "c"
    assert routed_to(proxy, "/canary/x", headers=[("x-canary", "1")]) == "c"
    assert routed_to(proxy, "/canary/x", headers=[("X-Canary", "2")]) == "a"
    assert routed_to(proxy, "/canary/x") == "a"


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/strip/foo", "/foo"),
        ("/strip/foo/bar?q=1", "/foo/bar?q=1"),
        ("/strip", "/"),
        ("/strip/", "/"),
        ("/strip?x=1", "/?x=1"),
    ],
)
def test_strip_prefix(proxy: PgproxyProcess, target: str, forwarded: str) -> None:
    document = echo_of(request(proxy.port(), "GET", target))
    assert document["upstream"] == "a"
    assert document["target"] == forwarded, (
        f"{target} with strip_prefix should reach the upstream as {forwarded}"
    )


def test_respond_route(proxy: PgproxyProcess, upstreams: dict[str, Upstream]) -> None:
    response = request(proxy.port(), "GET", "/respond")
    assert response.status == 202, response.describe()
    assert response.body == b"accepted here"
    assert response.header("x-respond") == "yes"
    for upstream in upstreams.values():
        assert upstream.requests == [], "a respond route must not contact an upstream"


def test_respond_route_head(proxy: PgproxyProcess) -> None:
    response = request(proxy.port(), "HEAD", "/respond")
    assert response.status == 202, response.describe()
    assert response.body == b""


def test_route_limited_to_listener(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    assert_no_route(proxy, upstreams, "/other-only")
    document = echo_of(request(proxy.port("other"), "GET", "/other-only"))
    assert document["upstream"] == "a"


def test_routes_apply_to_every_listener_by_default(proxy: PgproxyProcess) -> None:
    document = echo_of(request(proxy.port("other"), "GET", "/api/x"))
    assert document["upstream"] == "b"


def test_absolute_form_target_routed(proxy: PgproxyProcess) -> None:
    """An absolute-form target whose host matches Host is routed on that host."""
    target = "http://api.example.com/abs?q=1"
    response = request(proxy.port(), "GET", target, host="api.example.com")
    document = echo_of(response)
    assert document["upstream"] == "b", "the route should follow the target's host"
    assert document["target"] == "/abs?q=1", "the upstream should get origin-form"
    assert echoed_header(document, "host") == ["api.example.com"]


def test_keep_alive_across_local_responses(proxy: PgproxyProcess) -> None:
    """A respond route and a 404 leave the connection usable for the next request."""
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/respond"))
        assert conn.read_response().status == 202
        conn.send(build_request("GET", "/nothing-here"))
        assert conn.read_response().status == 404
        conn.send(build_request("GET", "/api/after"))
        assert echo_of(conn.read_response())["upstream"] == "b"


# Path normalisation: routes match the decoded path without dot segments or
# repeated slashes, so other spellings of a path cannot bypass its route.


@pytest.mark.parametrize(
    "target", ["/%72espond", "/x/../respond", "//respond", "/./respond", "/%2e/respond"]
)
def test_other_spellings_reach_the_same_route(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream], target: str
) -> None:
    response = request(proxy.port(), "GET", target)
    assert response.status == 202, response.describe()
    assert response.body == b"accepted here"
    assert all(not upstream.requests for upstream in upstreams.values())


def test_upstream_gets_raw_target(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    target = "/api/%7Euser/./x?q=%41"
    assert routed_to(proxy, target) == "b"
    assert [r.target for r in upstreams["b"].requests] == [target]


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/strip/v1?x=1", "/v1?x=1"),
        ("/strip/./v1?x=1", "/v1?x=1"),
        ("/%73trip/v1", "/v1"),
        ("/strip//a%20b/../c", "/c"),
        ("/strip/caf%c3%a9", "/caf%C3%A9"),
    ],
)
def test_strip_prefix_applies_to_the_routed_path(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream], target: str, forwarded: str
) -> None:
    assert routed_to(proxy, target) == "a"
    assert [r.target for r in upstreams["a"].requests] == [forwarded]


@pytest.mark.parametrize("target", ["/%zz", "/api/%4", "/api%", "/respond%00"])
def test_invalid_escapes_get_400_and_reach_no_upstream(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream], target: str
) -> None:
    response = request(proxy.port(), "GET", target)
    assert response.status == 400, response.describe()
    assert all(not upstream.requests for upstream in upstreams.values())
