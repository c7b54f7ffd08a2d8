"""End-to-end tests of `redirect` routes, which no upstream takes part in."""

from __future__ import annotations

from e2e_client import RawConnection, build_request, request
from e2e_process import PgproxyFactory
from e2e_upstream import UpstreamFactory

CONFIG = """
[listeners.main]
address = "127.0.0.1:0"

[[routes]]
host = "old.test"
redirect = {{ host = "new.test", scheme = "https" }}

[[routes]]
path = "/docs"
redirect = {{ path = "/documentation/", status = 308 }}

[[routes]]
path_prefix = "/"
cluster = "api"

[clusters.api]
endpoints = ["{api}"]
"""


def test_redirects_keep_the_connection(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    api = upstream_factory("api")
    proxy = pgproxy_factory(CONFIG.format(api=api.address))

    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/a/b?x=1", host="old.test:8080"))
        moved = conn.read_response()
        conn.send(build_request("POST", "/docs?v=2", host="site.test:81", body=b"x"))
        docs = conn.read_response()
        conn.send(build_request("HEAD", "/docs", host="site.test"))
        head = conn.read_response(method="HEAD")
        conn.send(build_request("GET", "/proxied", host="site.test"))
        proxied = conn.read_response()

    assert moved.status == 301
    assert moved.header("location") == "https://new.test/a/b?x=1"
    assert moved.header("content-length") == "0"
    assert moved.body == b""
    assert docs.status == 308
    assert docs.header("location") == "http://site.test:81/documentation/?v=2"
    assert head.status == 308
    assert head.header("location") == "http://site.test/documentation/"
    assert proxied.status == 200
    assert len(api.requests) == 1


def test_redirect_access_log(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    api = upstream_factory("api")
    proxy = pgproxy_factory(CONFIG.format(api=api.address))

    response = request(proxy.port(), "GET", "/docs", host="site.test")
    [record] = proxy.wait_for_access(lambda record: record["path"] == "/docs")

    assert response.status == 308
    assert record["status"] == 308
    assert record["route"] == "routes[1]"
    assert record["cluster"] is None
    assert record["endpoint"] is None
