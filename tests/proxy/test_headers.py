"""Tests of header rewriting between downstream and upstream (RFC 9110 7.6)."""

from __future__ import annotations

import ipaddress

import pytest

from pgproxy.proxy.framing import check_request_head, check_response_head
from pgproxy.proxy.headers import (
    Forwarding,
    HeaderMap,
    build_interim_head,
    build_request_head,
    build_response_head,
    is_trusted,
    strip_path_prefix,
    strip_routed_prefix,
)

UNTRUSTED = Forwarding("203.0.113.9", b"http", trusted=False)
TRUSTED = Forwarding("10.1.2.3", b"https", trusted=True)


def parse_head(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    assert head.endswith(b"\r\n\r\n")
    first, *lines = head[:-4].split(b"\r\n")
    fields = []
    for line in lines:
        name, _, value = line.partition(b": ")
        fields.append((name, value))
    return first, fields


def values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in fields if key.lower() == name.lower()]


def upstream_head(
    headers: list[tuple[bytes, bytes]],
    *,
    method: bytes = b"GET",
    target: bytes = b"/",
    forwarding: Forwarding = UNTRUSTED,
    host: bytes = b"example.com",
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    info = check_request_head(method, target, "1.1", headers)
    return parse_head(
        build_request_head(method, target, headers, info, host, forwarding)
    )


def test_request_line_and_host_first() -> None:
    first, fields = upstream_head([(b"Host", b"example.com"), (b"Accept", b"*/*")])
    assert first == b"GET / HTTP/1.1"
    assert fields[0] == (b"Host", b"example.com")
    assert (b"Accept", b"*/*") in fields


def test_hop_by_hop_request_headers_removed() -> None:
    _, fields = upstream_head(
        [
            (b"Host", b"example.com"),
            (b"Connection", b"keep-alive, X-Private"),
            (b"X-Private", b"secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-T"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Upgrade", b"websocket"),
            (b"X-Kept", b"yes"),
        ]
    )
    names = {name.lower() for name, _ in fields}
    for dropped in (b"connection", b"x-private", b"keep-alive", b"te", b"trailer"):
        assert dropped not in names
    assert b"proxy-connection" not in names
    assert b"upgrade" not in names
    assert values(fields, b"X-Kept") == [b"yes"]


def test_forwarded_headers_replaced_from_untrusted_peer() -> None:
    _, fields = upstream_head(
        [
            (b"Host", b"example.com"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"evil.com"),
        ]
    )
    assert values(fields, b"X-Forwarded-For") == [b"203.0.113.9"]
    assert values(fields, b"X-Forwarded-Proto") == [b"http"]
    assert values(fields, b"X-Forwarded-Host") == [b"example.com"]


def test_forwarded_headers_kept_from_trusted_peer() -> None:
    _, fields = upstream_head(
        [
            (b"Host", b"example.com"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"X-Forwarded-For", b"5.6.7.8"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"public.example"),
        ],
        forwarding=TRUSTED,
    )
    assert values(fields, b"X-Forwarded-For") == [b"1.2.3.4, 5.6.7.8, 10.1.2.3"]
    assert values(fields, b"X-Forwarded-Proto") == [b"https"]
    assert values(fields, b"X-Forwarded-Host") == [b"public.example"]


def test_via_appended() -> None:
    _, fields = upstream_head([(b"Host", b"example.com"), (b"Via", b"1.0 fred")])
    assert values(fields, b"Via") == [b"1.0 fred, 1.1 pgproxy"]


def test_host_policy_value_sent() -> None:
    _, fields = upstream_head([(b"Host", b"example.com")], host=b"10.0.0.1:8000")
    assert values(fields, b"Host") == [b"10.0.0.1:8000"]
    assert values(fields, b"X-Forwarded-Host") == [b"example.com"]


def test_body_framing_rewritten() -> None:
    _, chunked = upstream_head(
        [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")], method=b"POST"
    )
    _, length = upstream_head(
        [(b"Host", b"a"), (b"Content-Length", b"7, 7")], method=b"POST"
    )
    assert values(chunked, b"Transfer-Encoding") == [b"chunked"]
    assert values(chunked, b"Content-Length") == []
    assert values(length, b"Content-Length") == [b"7"]
    assert values(length, b"Transfer-Encoding") == []


def test_expect_not_forwarded() -> None:
    _, fields = upstream_head(
        [(b"Host", b"a"), (b"Expect", b"100-continue"), (b"Content-Length", b"1")],
        method=b"POST",
    )
    assert values(fields, b"Expect") == []


def test_upgrade_request_keeps_upgrade() -> None:
    _, fields = upstream_head(
        [(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    )
    assert values(fields, b"Connection") == [b"upgrade"]
    assert values(fields, b"Upgrade") == [b"websocket"]


def response_head(
    headers: list[tuple[bytes, bytes]],
    *,
    status: int = 200,
    chunked: bool = False,
    keep_alive: bool = True,
    client_http10: bool = False,
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    info = check_response_head(status, "1.1", headers, False)
    head = build_response_head(
        status,
        b"OK",
        headers,
        info,
        chunked=chunked,
        keep_alive=keep_alive,
        client_http10=client_http10,
    )
    return parse_head(head)


def test_response_hop_by_hop_removed_and_via_added() -> None:
    first, fields = response_head(
        [
            (b"Content-Length", b"3"),
            (b"Connection", b"X-Internal"),
            (b"X-Internal", b"1"),
            (b"Keep-Alive", b"timeout=4"),
            (b"Server", b"app"),
        ]
    )
    assert first == b"HTTP/1.1 200 OK"
    assert values(fields, b"X-Internal") == []
    assert values(fields, b"Keep-Alive") == []
    assert values(fields, b"Connection") == []
    assert values(fields, b"Server") == [b"app"]
    assert values(fields, b"Via") == [b"1.1 pgproxy"]
    assert values(fields, b"Content-Length") == [b"3"]


@pytest.mark.parametrize(
    "lengths",
    [[(b"Content-Length", b"5, 5")], [(b"Content-Length", b"5")] * 2,
     [(b"content-length", b"005")]],
)  # fmt: skip
def test_response_length_written_once(lengths: list[tuple[bytes, bytes]]) -> None:
    _, fields = response_head([*lengths, (b"Server", b"app")])
    assert values(fields, b"Content-Length") == [b"5"]
    assert values(fields, b"Server") == [b"app"]


def test_response_rechunked() -> None:
    _, fields = response_head([(b"Transfer-Encoding", b"chunked")], chunked=True)
    assert values(fields, b"Transfer-Encoding") == [b"chunked"]


def test_response_connection_close() -> None:
    _, fields = response_head([(b"Content-Length", b"0")], keep_alive=False)
    assert values(fields, b"Connection") == [b"close"]


def test_http10_client_kept_alive() -> None:
    _, fields = response_head([(b"Content-Length", b"0")], client_http10=True)
    assert values(fields, b"Connection") == [b"keep-alive"]


def test_switching_protocols_keeps_upgrade() -> None:
    _, fields = response_head(
        [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], status=101
    )
    assert values(fields, b"Connection") == [b"upgrade"]
    assert values(fields, b"Upgrade") == [b"websocket"]


def test_interim_head() -> None:
    head = build_interim_head(103, b"Early Hints", [(b"Link", b"</a.css>")])
    assert head == b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"


@pytest.mark.parametrize(
    ("target", "prefix", "stripped"),
    [
        (b"/api/x", b"/api", b"/x"),
        (b"/api", b"/api", b"/"),
        (b"/api?q=1", b"/api", b"/?q=1"),
        (b"/api/", b"/api/", b"/"),
        (b"/api/v1", b"/api/", b"/v1"),
        (b"/other", b"/api", b"/other"),
    ],
)
def test_strip_path_prefix(target: bytes, prefix: bytes, stripped: bytes) -> None:
    assert strip_path_prefix(target, prefix) == stripped


def test_is_trusted() -> None:
    networks = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert is_trusted("10.2.3.4", networks)
    assert is_trusted("::1", networks)
    assert not is_trusted("192.0.2.1", networks)
    assert not is_trusted("not-an-ip", networks)
    assert not is_trusted("10.2.3.4", [])


def test_header_map_joins_repeated_fields() -> None:
    mapping = HeaderMap([(b"X-A", b"1"), (b"x-a", b"2"), (b"Cookie", b"k=v")])
    assert mapping["x-a"] == "1, 2"
    assert mapping.get("cookie") == "k=v"
    assert mapping.get("missing") is None
    assert len(mapping) == 2


@pytest.mark.parametrize(
    ("target", "prefix", "expected"),
    [
        (b"/api/v1?x=1", b"/api", b"/v1?x=1"),
        (b"/api/./v1?x=%41", b"/api", b"/v1?x=%41"),
        (b"/%61pi/v1", b"/api", b"/v1"),
        (b"/api", b"/api", b"/"),
        (b"/caf%c3%a9/x", b"/caf%C3%A9", b"/x"),
        (b"/other/x", b"/api", b"/other/x"),
    ],
)
def test_strip_routed_prefix(target: bytes, prefix: bytes, expected: bytes) -> None:
    assert strip_routed_prefix(target, prefix) == expected
