"""Hostile spellings of a request path against routes that deny /admin.

One pgproxy process serves the module: `/admin` and the exact path `/secret`
respond with 403 in front of a catch-all cluster, and two strip_prefix routes
forward to their own cluster. Each spelling of a denied path must meet the
deny route; the spellings that do not name it reach the catch-all with the
client's target unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_client import echo_of, request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory

CONFIG = """
[server]
access_log = "off"
drain_timeout = "1s"

[listeners.main]
address = "127.0.0.1:0"

[clusters.all]
endpoints = ["{all}"]

[clusters.stripped]
endpoints = ["{stripped}"]

[[routes]]
name = "admin"
path_prefix = "/admin"
respond = {{ status = 403 }}

[[routes]]
name = "secret"
path = "/secret"
respond = {{ status = 403 }}

[[routes]]
name = "api"
path_prefix = "/api"
strip_prefix = true
cluster = "stripped"

[[routes]]
name = "braces"
path_prefix = "/v{{1}}"
strip_prefix = true
cluster = "stripped"

[[routes]]
name = "all"
path_prefix = "/"
cluster = "all"
"""


@pytest.fixture(scope="module")
def upstreams(module_upstream_factory: UpstreamFactory) -> dict[str, Upstream]:
    return {name: module_upstream_factory(name) for name in ("all", "stripped")}


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


@pytest.mark.parametrize(
    "target",
    [
        "/%61dmin",
        "/%61%64%6D%69%6E",
        "/admin%2Fx",
        "/x%2f..%2fadmin",
        "/x/%2E%2e/admin",
        "/admin/.",
        "/./admin",
        "//admin",
        "/x/../admin",
        "/x/../../../admin/",
        "/./secret",
        "/x/%2e%2e/secret",
        "/%73ecret",
    ],
)
def test_spellings_of_a_denied_path_are_denied(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream], target: str
) -> None:
    response = request(proxy.port(), target=target)
    assert response.status == 403, f"{target} bypassed the deny route"
    assert upstreams["all"].requests == []


@pytest.mark.parametrize(
    "target",
    ["/%2561dmin", "/x?/../admin", "/admin.", "/x/%C0%AE%C0%AE/admin", "/adminx"],
)
def test_other_paths_reach_the_upstream_as_sent(
    proxy: PgproxyProcess, target: str
) -> None:
    echo = echo_of(request(proxy.port(), target=target))
    assert (echo["upstream"], echo["target"]) == ("all", target)


@pytest.mark.parametrize(
    "target",
    ["/a%zz", "/a%", "/a%2", "/%00", "/api/x%00", "/admin#x", "/x#/../admin"],
)
def test_invalid_escapes_get_400(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream], target: str
) -> None:
    assert request(proxy.port(), target=target).status == 400
    assert upstreams["all"].requests == upstreams["stripped"].requests == []


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/api/./v1", "/v1"),
        ("/%61pi/v1?q=%2F", "/v1?q=%2F"),
        ("/api/a%20b", "/a%20b"),
        ("/api/%3F%23x", "/%3F%23x"),
        ("/api/a%0d%0aX:%20y", "/a%0D%0AX:%20y"),
        ("/api/a%25b", "/a%25b"),
        ("/api//x", "/x"),
        ("/v{1}/x", "/x"),
        ("/v%7B1%7D/x", "/x"),
        ("/v{1}", "/"),
    ],
)
def test_strip_prefix_forwards_a_well_formed_target(
    proxy: PgproxyProcess, target: str, forwarded: str
) -> None:
    echo = echo_of(request(proxy.port(), target=target))
    assert (echo["upstream"], echo["target"]) == ("stripped", forwarded)
