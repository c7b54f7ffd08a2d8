"""Redirect.location and render: the Location of a `redirect` route (pure)."""

from __future__ import annotations

import pytest

from pgproxy.graph.settings import RedirectSettings
from pgproxy.proxy.respond import Redirect


def redirect(
    *,
    status: int = 301,
    scheme: str | None = None,
    host: str | None = None,
    port: int | None = None,
    path: str | None = None,
    strip_query: bool = False,
) -> Redirect:
    return Redirect(RedirectSettings(status, scheme, host, port, path, strip_query))


@pytest.mark.parametrize(
    ("rule", "proto", "host", "target", "expected"),
    [
        # http -> https drops the request's port: it belonged to http.
        (
            redirect(scheme="https"),
            b"http",
            b"a.test:8080",
            b"/x?y=1",
            b"https://a.test/x?y=1",
        ),
        (
            redirect(scheme="https", port=8443),
            b"http",
            b"a.test",
            b"/",
            b"https://a.test:8443/",
        ),
        (
            redirect(scheme="https", port=443),
            b"http",
            b"a.test",
            b"/",
            b"https://a.test/",
        ),
        # A new host drops the port; the path and query stay.
        (redirect(host="b.test"), b"http", b"A.Test:81", b"/p?q", b"http://b.test/p?q"),
        # Only the path changes: scheme, host and port stay.
        (
            redirect(path="/new"),
            b"https",
            b"a.test:8443",
            b"/old?q=1",
            b"https://a.test:8443/new?q=1",
        ),
        (redirect(path="/new"), b"http", b"a.test:80", b"/old", b"http://a.test/new"),
        (
            redirect(path="/new", strip_query=True),
            b"http",
            b"a.test",
            b"/o?q",
            b"http://a.test/new",
        ),
        # The same scheme named explicitly keeps the port too.
        (
            redirect(scheme="http", path="/n"),
            b"http",
            b"a.test:81",
            b"/",
            b"http://a.test:81/n",
        ),
        (redirect(path="/n"), b"http", b"[::1]:8080", b"/", b"http://[::1]:8080/n"),
        (redirect(scheme="https"), b"http", b"[::1]:8080", b"/", b"https://[::1]/"),
        (redirect(host="b.test"), b"http", b"a.test", b"*", b"http://b.test/"),
    ],
)
def test_location(
    rule: Redirect, proto: bytes, host: bytes, target: bytes, expected: bytes
) -> None:
    assert rule.location(proto, host, target) == expected


def test_unknown_host_without_configured_host() -> None:
    assert redirect(path="/x").location(b"http", b"", b"/") is None


def test_configured_host_needs_no_request_host() -> None:
    assert redirect(host="b.test").location(b"http", b"", b"/a") == b"http://b.test/a"


def test_render_keep_alive() -> None:
    head = redirect(status=308, path="/n").render(b"http://a.test/n", close=False)

    assert head == (
        b"HTTP/1.1 308 Permanent Redirect\r\nContent-Length: 0\r\n"
        b"Location: http://a.test/n\r\n\r\n"
    )


def test_render_close() -> None:
    head = redirect(path="/n").render(b"http://a.test/n", close=True)

    assert head.endswith(b"Location: http://a.test/n\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 301 Moved Permanently\r\n")
