"""HeaderRules.apply on heads as pgproxy builds them (pure, no sockets)."""

from __future__ import annotations

from pgproxy.graph.settings import HeaderRulesSettings
from pgproxy.proxy.header_rules import HeaderRules


def rules(
    set_: tuple[tuple[str, str], ...] = (),
    add: tuple[tuple[str, str], ...] = (),
    remove: tuple[str, ...] = (),
) -> HeaderRules:
    return HeaderRules(HeaderRulesSettings(set=set_, add=add, remove=remove))


HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: app/1.2\r\n"
    b"Content-Type: text/plain\r\n"
    b"X-Trace: a\r\n"
    b"x-trace: b\r\n"
    b"Content-Length: 2\r\n"
    b"Via: 1.1 pgproxy\r\n"
    b"\r\n"
)


def test_remove_drops_every_case() -> None:
    result = rules(remove=("X-TRACE",)).apply(HEAD)

    assert b"trace" not in result.lower()
    assert result.startswith(b"HTTP/1.1 200 OK\r\nServer: app/1.2\r\n")
    assert result.endswith(b"Content-Length: 2\r\nVia: 1.1 pgproxy\r\n\r\n")


def test_set_replaces_received_fields() -> None:
    result = rules(set_=(("Server", "edge"),)).apply(HEAD)

    assert b"app/1.2" not in result
    assert result.count(b"Server: ") == 1
    assert result.endswith(b"Via: 1.1 pgproxy\r\nServer: edge\r\n\r\n")


def test_add_keeps_received_fields() -> None:
    result = rules(add=(("X-Trace", "c"),)).apply(HEAD)

    assert result.count(b"X-Trace: ") == 2
    assert b"x-trace: b\r\n" in result
    assert result.endswith(b"X-Trace: c\r\n\r\n")


def test_no_match_keeps_head_bytes() -> None:
    assert rules(remove=("x-absent",)).apply(HEAD) == HEAD


def test_status_line_only() -> None:
    head = b"HTTP/1.1 204 No Content\r\n\r\n"

    result = rules(set_=(("X-A", "1"),), add=(("X-B", "2"),)).apply(head)

    assert result == b"HTTP/1.1 204 No Content\r\nX-A: 1\r\nX-B: 2\r\n\r\n"


def test_request_line_is_kept() -> None:
    head = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Debug: 1\r\n\r\n"

    result = rules(remove=("x-debug",), set_=(("X-Env", "prod"),)).apply(head)

    assert result == b"GET /x HTTP/1.1\r\nHost: a\r\nX-Env: prod\r\n\r\n"


def test_values_are_utf8() -> None:
    result = rules(add=(("X-Name", "café"),)).apply(b"HTTP/1.1 200 OK\r\n\r\n")

    assert b"X-Name: caf\xc3\xa9\r\n" in result
