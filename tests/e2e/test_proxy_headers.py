"""Header rules through a real pgproxy process (RFC 9110 section 7.6).

Hop-by-hop headers are removed in both directions, Via is added, the
X-Forwarded-* headers are set (kept from trusted proxies only), and the
Host header sent upstream follows the cluster's `host_header` mode.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_client import (
    RawConnection,
    build_request,
    chunk,
    echo_of,
    echoed_header,
    request,
)
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory, raw, response_bytes

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"
{server_extra}

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
path_prefix = "/endpoint"
cluster = "endpoint"

[[routes]]
path_prefix = "/literal"
cluster = "literal"

[[routes]]
path_prefix = "/"
cluster = "preserve"

[clusters.preserve]
endpoints = ["{a}"]

[clusters.endpoint]
endpoints = ["{a}"]
host_header = "endpoint"

[clusters.literal]
endpoints = ["{a}"]
host_header = "internal.example"
"""

HOP_BY_HOP_REQUEST = [
    ("Connection", "keep-alive, X-Drop-Me"),
    ("X-Drop-Me", "1"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Trailer", "X-Trailer"),
    ("Proxy-Connection", "keep-alive"),
    ("Upgrade", "h2c"),
    ("X-Keep-Me", "yes"),
]


@pytest.fixture(scope="module")
def upstream(module_upstream_factory: UpstreamFactory) -> Upstream:
    return module_upstream_factory("a")


@pytest.fixture(scope="module")
def proxy(module_pgproxy_factory: PgproxyFactory, upstream: Upstream) -> PgproxyProcess:
    return module_pgproxy_factory(CONFIG.format(a=upstream.address, server_extra=""))


@pytest.fixture(scope="module")
def trusting_proxy(
    module_pgproxy_factory: PgproxyFactory, upstream: Upstream
) -> PgproxyProcess:
    extra = 'trusted_proxies = ["127.0.0.0/8"]'
    return module_pgproxy_factory(CONFIG.format(a=upstream.address, server_extra=extra))


@pytest.fixture(autouse=True)
def fresh_upstream(upstream: Upstream) -> Iterator[None]:
    upstream.reset()
    yield


def test_request_hop_by_hop_removed(proxy: PgproxyProcess) -> None:
    document = echo_of(request(proxy.port(), "GET", "/hop", headers=HOP_BY_HOP_REQUEST))
    received = {name.lower() for name, _ in document["headers"]}
    for name in (
        "x-drop-me",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "upgrade",
    ):
        assert name not in received, (
            f"hop-by-hop request header {name} reached the upstream"
        )
    for value in echoed_header(document, "connection"):
        assert "x-drop-me" not in value.lower(), (
            f"Connection forwarded with its options: {value}"
        )
    assert echoed_header(document, "x-keep-me") == ["yes"], (
        "an end-to-end header was dropped"
    )


def test_chunked_request_reframed(proxy: PgproxyProcess) -> None:
    head = build_request("POST", "/reframe", headers=[("Transfer-Encoding", "chunked")])
    with RawConnection(proxy.port()) as conn:
        conn.send(head + chunk(b"abc") + chunk(b"def") + b"0\r\n\r\n")
        document = echo_of(conn.read_response())
    assert document["body"] == "abcdef"
    transfer_encoding = echoed_header(document, "transfer-encoding")
    content_length = echoed_header(document, "content-length")
    assert len(transfer_encoding) + len(content_length) == 1, (
        "the upstream request must have exactly one framing header: TE "
        f"{transfer_encoding}, "
        f"CL {content_length}"
    )


def test_response_hop_by_hop_removed(proxy: PgproxyProcess, upstream: Upstream) -> None:
    headers = [
        ("Connection", "X-Resp-Drop"),
        ("X-Resp-Drop", "1"),
        ("Keep-Alive", "timeout=3"),
        ("Proxy-Connection", "keep-alive"),
        ("Upgrade", "h2c"),
        ("X-Resp-Keep", "yes"),
    ]
    upstream.handler = raw(response_bytes(200, b"hop", headers))
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", "/resp-hop"))
        response = conn.read_response()
    names = response.header_names()
    for name in ("x-resp-drop", "keep-alive", "proxy-connection", "upgrade"):
        assert name not in names, (
            f"hop-by-hop response header {name} reached the client"
        )
    assert "x-resp-drop" not in (response.header("connection") or "").lower()
    assert response.header("x-resp-keep") == "yes"
    assert response.body == b"hop"


def test_via_added_both_ways(proxy: PgproxyProcess) -> None:
    response = request(proxy.port(), "GET", "/via", headers=[("Via", "1.0 edge")])
    document = echo_of(response)
    via_upstream = ", ".join(echoed_header(document, "via"))
    assert via_upstream.startswith("1.0 edge"), (
        f"the client's Via was lost: {via_upstream!r}"
    )
    assert "1.1 pgproxy" in via_upstream, f"Via sent upstream: {via_upstream!r}"
    assert "1.1 pgproxy" in ", ".join(response.header_all("via")), response.describe()


def test_forwarded_headers_replaced_from_untrusted(proxy: PgproxyProcess) -> None:
    spoofed = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "spoofed.example"),
    ]
    document = echo_of(
        request(proxy.port(), "GET", "/xff", headers=spoofed, host="site.example")
    )
    assert echoed_header(document, "x-forwarded-for") == ["127.0.0.1"]
    assert echoed_header(document, "x-forwarded-proto") == ["http"]
    assert echoed_header(document, "x-forwarded-host") == ["site.example"]


def test_forwarded_headers_set_without_inbound(proxy: PgproxyProcess) -> None:
    document = echo_of(
        request(proxy.port(), "GET", "/xff-none", host="site.example:8443")
    )
    assert echoed_header(document, "x-forwarded-for") == ["127.0.0.1"]
    assert echoed_header(document, "x-forwarded-proto") == ["http"]
    assert echoed_header(document, "x-forwarded-host") == ["site.example:8443"]


def test_forwarded_headers_kept_from_trusted(trusting_proxy: PgproxyProcess) -> None:
    inbound = [
        ("X-Forwarded-For", "203.0.113.9"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "public.example"),
    ]
    document = echo_of(
        request(
            trusting_proxy.port(), "GET", "/xff", headers=inbound, host="site.example"
        )
    )
    assert echoed_header(document, "x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]
    assert echoed_header(document, "x-forwarded-proto") == ["https"]
    assert echoed_header(document, "x-forwarded-host") == ["public.example"]


def test_host_header_preserve(proxy: PgproxyProcess) -> None:
    document = echo_of(
        request(proxy.port(), "GET", "/preserve", host="client.example:81")
    )
    assert echoed_header(document, "host") == ["client.example:81"]


def test_host_header_endpoint(proxy: PgproxyProcess, upstream: Upstream) -> None:
    document = echo_of(request(proxy.port(), "GET", "/endpoint", host="client.example"))
    assert echoed_header(document, "host") == [upstream.address]


def test_host_header_literal(proxy: PgproxyProcess) -> None:
    document = echo_of(request(proxy.port(), "GET", "/literal", host="client.example"))
    assert echoed_header(document, "host") == ["internal.example"]
