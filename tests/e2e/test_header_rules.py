"""End-to-end tests of route `request_headers` and `response_headers` rules.

Request rules change what the upstream receives. Response rules change
what the client receives, both when pgproxy reads the response head
itself (Content-Length) and when llhttp does (chunked). pgproxy's own
error responses and other routes stay as they are.
"""

from __future__ import annotations

from e2e_client import echo_of, request
from e2e_process import PgproxyFactory
from e2e_upstream import UpstreamFactory, by_path, chunked, echo, fixed

CONFIG = """
[listeners.main]
address = "127.0.0.1:0"

[[routes]]
path_prefix = "/ruled"
cluster = "api"
[routes.request_headers]
set = {{ X-Env = "prod" }}
add = {{ X-Added = "1" }}
remove = ["x-debug"]

[routes.response_headers]
set = {{ Strict-Transport-Security = "max-age=63072000" }}
remove = ["server", "x-powered-by"]

[[routes]]
path_prefix = "/dead"
cluster = "dead"
response_headers = {{ set = {{ Strict-Transport-Security = "max-age=1" }} }}

[[routes]]
path_prefix = "/"
cluster = "api"

[clusters.api]
endpoints = ["{api}"]

[clusters.dead]
endpoints = ["{dead}"]
"""

APP_HEADERS = [("Server", "app/1.2"), ("X-Powered-By", "php"), ("X-Kept", "yes")]


def request_names(document: dict[str, object]) -> list[str]:
    headers = document["headers"]
    assert isinstance(headers, list)
    return [name.lower() for name, _ in headers]


def test_request_rules_change_upstream_request(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    api = upstream_factory("api")
    api.handler = echo
    proxy = pgproxy_factory(CONFIG.format(api=api.address, dead="127.0.0.1:9"))
    headers = [("X-Env", "dev"), ("x-env", "qa"), ("X-Debug", "1"), ("X-Other", "o")]

    ruled = echo_of(request(proxy.port(), "GET", "/ruled/a", headers=headers))
    plain = echo_of(request(proxy.port(), "GET", "/plain", headers=headers))

    assert ["X-Env", "prod"] in ruled["headers"]
    assert request_names(ruled).count("x-env") == 1
    assert ["X-Added", "1"] in ruled["headers"]
    assert "x-debug" not in request_names(ruled)
    assert ["X-Other", "o"] in ruled["headers"]
    assert request_names(plain).count("x-env") == 2
    assert "x-debug" in request_names(plain)


def test_response_rules_on_length_and_chunked(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    api = upstream_factory("api")
    length = fixed(200, b"body", headers=APP_HEADERS)
    api.handler = by_path({"/ruled/chunked": chunked([b"ab", b"cd"])}, length)
    proxy = pgproxy_factory(CONFIG.format(api=api.address, dead="127.0.0.1:9"))

    by_length = request(proxy.port(), "GET", "/ruled/length")
    by_chunks = request(proxy.port(), "GET", "/ruled/chunked")
    plain = request(proxy.port(), "GET", "/plain")

    assert by_length.status == 200
    assert by_length.body == b"body"
    assert by_length.header("server") is None
    assert by_length.header("x-powered-by") is None
    assert by_length.header("x-kept") == "yes"
    assert by_length.header("strict-transport-security") == "max-age=63072000"
    assert by_length.header("content-length") == "4"
    assert by_chunks.status == 200
    assert by_chunks.body == b"abcd"
    assert by_chunks.header("strict-transport-security") == "max-age=63072000"
    assert plain.header("server") == "app/1.2"
    assert plain.header("strict-transport-security") is None


def test_own_error_response_is_not_ruled(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    dead_address: str,
) -> None:
    api = upstream_factory("api")
    proxy = pgproxy_factory(CONFIG.format(api=api.address, dead=dead_address))

    response = request(proxy.port(), "GET", "/dead")

    assert response.status == 502
    assert response.header("strict-transport-security") is None
