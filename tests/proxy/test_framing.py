"""Tests of the request and response framing checks (RFC 9112 section 6).

Every test runs twice: once with the Python request head check alone, and
once with the C check in front of it when the C module is built. In the
second run `check` also asserts that the C check accepts only heads that the
Python check accepts, with the same RequestInfo.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest

from pgproxy.proxy import framing
from pgproxy.proxy.framing import (
    BadResponseError,
    CCheckHead,
    FramingError,
    RequestInfo,
    byte_map,
    check_request_head_c,
    check_request_head_python,
    check_response_head,
    connection_tokens,
    host_without_port,
)

HOST = (b"Host", b"example.com")
# The C check's check_head, or None while the tests run the Python check alone.
C_CHECK: CCheckHead | None = None


@pytest.fixture(autouse=True, params=["python", "c"])
def request_check(request: pytest.FixtureRequest) -> None:
    """Run the test with the Python check alone, or with the C check first."""
    global C_CHECK
    C_CHECK = None
    if request.param == "c":
        c_module = pytest.importorskip("pgproxy.proxy._request_head")
        C_CHECK = c_module.check_head


def request_info_fields(info: RequestInfo) -> dict[str, object]:
    """Return every public attribute of a RequestInfo, by name."""
    return {name: getattr(info, name) for name in dir(info) if not name.startswith("_")}


def check(
    headers: list[tuple[bytes, bytes]],
    *,
    method: bytes = b"POST",
    target: bytes = b"/",
    version: str = "1.1",
) -> RequestInfo:
    if C_CHECK is None:
        return check_request_head_python(method, target, version, headers)
    found = check_request_head_c(C_CHECK, target, version, headers)
    try:
        expected = check_request_head_python(method, target, version, headers)
    except FramingError:
        assert found is None, "the C check accepted a head that Python rejects"
        raise
    if found is None:
        return expected
    assert request_info_fields(found) == request_info_fields(expected)
    return found


def rejected(headers: list[tuple[bytes, bytes]], **kwargs: object) -> int:
    with pytest.raises(FramingError) as info:
        check(headers, **kwargs)  # type: ignore[arg-type]
    return info.value.status


def test_plain_get_has_no_body() -> None:
    info = check([HOST], method=b"GET")
    assert not info.has_body
    assert info.content_length is None
    assert not info.chunked
    assert info.keep_alive
    assert info.host == "example.com"


def test_content_length_body() -> None:
    info = check([HOST, (b"Content-Length", b"12")])
    assert info.content_length == 12
    assert info.has_body


def test_identical_content_length_values_accepted() -> None:
    info = check([HOST, (b"Content-Length", b"5, 5"), (b"content-length", b"5")])
    assert info.content_length == 5


@pytest.mark.parametrize(
    "values",
    [
        [b"5", b"6"],
        [b"5, 6"],
        [b"+5"],
        [b"-1"],
        [b"5 5"],
        [b"0x10"],
        [b""],
        [b"1" * 19],
    ],
)
def test_bad_content_length_is_400(values: list[bytes]) -> None:
    headers = [HOST] + [(b"Content-Length", value) for value in values]
    assert rejected(headers) == 400


def test_content_length_with_transfer_encoding_is_400() -> None:
    headers = [HOST, (b"Content-Length", b"3"), (b"Transfer-Encoding", b"chunked")]
    assert rejected(headers) == 400


def test_chunked_body() -> None:
    info = check([HOST, (b"Transfer-Encoding", b"Chunked")])
    assert info.chunked
    assert info.content_length is None


@pytest.mark.parametrize(
    ("values", "status"),
    [
        ([b"gzip"], 400),
        ([b"chunked, gzip"], 400),
        ([b"chunked", b"chunked"], 400),
        ([b"chunked, chunked"], 400),
        ([b"xchunked"], 400),
        ([b""], 400),
        ([b"gzip, chunked"], 501),
        ([b"gzip", b"chunked"], 501),
    ],
)
def test_unsupported_transfer_encoding(values: list[bytes], status: int) -> None:
    headers = [HOST] + [(b"Transfer-Encoding", value) for value in values]
    assert rejected(headers) == status


def test_transfer_encoding_in_http10_is_400() -> None:
    assert rejected([HOST, (b"Transfer-Encoding", b"chunked")], version="1.0") == 400


@pytest.mark.parametrize("version", ["0.9", "1.2", "2.0", "3.0"])
def test_other_http_versions_are_505(version: str) -> None:
    assert rejected([HOST], version=version) == 505


def test_missing_host_in_http11_is_400() -> None:
    assert rejected([]) == 400


def test_missing_host_in_http10_is_accepted() -> None:
    info = check([], version="1.0", method=b"GET")
    assert info.host is None
    assert not info.keep_alive


def test_two_host_headers_are_400() -> None:
    assert rejected([HOST, (b"Host", b"other.com")]) == 400


@pytest.mark.parametrize(
    "host",
    [
        b"a@b.com",
        b"a/b",
        b"a b",
        b"a.example\\",
        b"a.example?",
        b"a.example#",
        b"a.example\xc2\xa0",
        b"a.example:x",
        b"x:a.example",
        b"a.example:80:80",
        b"[a.example]",
        b"[::1",
        b"[::1]x",
        b"a%zz.example",
        b"a.example\x00",
    ],
)
def test_invalid_host_is_400(host: bytes) -> None:
    assert rejected([(b"Host", host)]) == 400


@pytest.mark.parametrize(
    "host",
    [
        b"a.example",
        b"A.Example.:8080",
        b"a.example:",
        b"a-b_c~d.example",
        b"a%2Db.example",
        b"127.0.0.1:80",
        b"[::1]",
        b"[2001:db8::1]:443",
        b"[v1.fe80::a+en1]",
        b"a!$&'()*+,;=.example",
    ],
)
def test_valid_host_is_accepted(host: bytes) -> None:
    assert check([(b"Host", host)]).host_raw == host


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"X Bad", b"v"),
        (b"X-Bad:", b"v"),
        (b"", b"v"),
        (b"X-Bad ", b"v"),
        (b"X-A", b"a\x00b"),
        (b"X-A", b"a\rb"),
        (b"X-A", b"a\nb"),
        (b"X-A", b"a\x7fb"),
    ],
)
def test_invalid_fields_are_400(name: bytes, value: bytes) -> None:
    assert rejected([HOST, (name, value)]) == 400


def test_obs_text_in_value_is_accepted() -> None:
    check([HOST, (b"X-A", b"caf\xe9\tok")])


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"GET", b"*"),
        (b"GET", b"x"),
        (b"GET", b"//"[:1] + b"a b"),
        (b"GET", b"ftp://example.com/"),
        (b"GET", b"http://user@example.com/"),
        (b"GET", b"http:///x"),
        (b"GET", b"/admin#x"),
        (b"GET", b"/#"),
        (b"GET", b"/x?a=1#/../admin"),
        (b"GET", b"http://example.com/admin#x"),
    ],
)
def test_invalid_targets_are_400(method: bytes, target: bytes) -> None:
    assert rejected([HOST], method=method, target=target) == 400


def test_connect_is_501() -> None:
    assert rejected([HOST], method=b"CONNECT", target=b"example.com:443") == 501


def test_options_asterisk_is_accepted() -> None:
    info = check([HOST], method=b"OPTIONS", target=b"*")
    assert info.target == b"*"


def test_absolute_form_uses_its_authority() -> None:
    info = check(
        [(b"Host", b"Example.com:8080")],
        method=b"GET",
        target=b"http://example.com:8080/a?b=1",
    )
    assert info.target == b"/a?b=1"
    assert info.host == "example.com"
    assert info.host_raw == b"example.com:8080"


def test_absolute_form_without_host_is_400() -> None:
    assert rejected([], method=b"GET", target=b"http://example.com/") == 400


def test_absolute_form_http10_needs_no_host() -> None:
    info = check([], method=b"GET", target=b"http://example.com/a", version="1.0")
    assert info.host == "example.com"


def test_absolute_form_host_mismatch_is_400() -> None:
    headers = [(b"Host", b"other.com")]
    assert rejected(headers, method=b"GET", target=b"http://example.com/") == 400


def test_connection_close_and_tokens() -> None:
    info = check([HOST, (b"Connection", b"close, X-Secret")], method=b"GET")
    assert not info.keep_alive
    assert info.connection_tokens == frozenset({b"close", b"x-secret"})


@pytest.mark.parametrize(
    ("values", "tokens"),
    [
        ([], set()),
        ([b"keep-alive"], {b"keep-alive"}),
        ([b"Close"], {b"close"}),
        ([b"Upgrade"], {b"upgrade"}),
        ([b"KEEP-ALIVE"], {b"keep-alive"}),
        ([b" close "], {b"close"}),
        ([b"close", b"Keep-Alive"], {b"close", b"keep-alive"}),
        ([b"Upgrade, HTTP2-Settings"], {b"upgrade", b"http2-settings"}),
    ],
)
def test_connection_tokens_are_lower_cased_and_trimmed(
    values: list[bytes], tokens: set[bytes]
) -> None:
    assert connection_tokens(values) == frozenset(tokens)


def test_http10_keep_alive_token() -> None:
    info = check([HOST, (b"Connection", b"Keep-Alive")], method=b"GET", version="1.0")
    assert info.keep_alive


def test_upgrade_needs_connection_upgrade() -> None:
    plain = check([HOST, (b"Upgrade", b"websocket")], method=b"GET")
    upgrade = check(
        [HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], method=b"GET"
    )
    assert plain.upgrade is None
    assert upgrade.upgrade == b"websocket"


def test_expect_continue() -> None:
    info = check([HOST, (b"Expect", b"100-Continue"), (b"Content-Length", b"1")])
    assert info.expect_continue


def test_unknown_expectation_is_417() -> None:
    assert rejected([HOST, (b"Expect", b"something")]) == 417


def test_idempotency_key_noted() -> None:
    assert check([HOST, (b"Idempotency-Key", b"k1")]).has_idempotency_key


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        (b"Example.COM", "example.com"),
        (b"example.com:81", "example.com"),
        (b"[::1]:8080", "[::1]"),
        (b"127.0.0.1:80", "127.0.0.1"),
    ],
)
def test_host_without_port(raw: bytes, host: str) -> None:
    assert host_without_port(raw) == host
    assert host_without_port(raw) == host  # returned from the cache


def test_host_cache_stays_bounded() -> None:
    long_host = b"a" * 1000 + b".example"
    assert host_without_port(long_host + b":80") == long_host.decode()
    assert long_host + b":80" not in framing._HOSTS
    for index in range(3000):
        assert host_without_port(b"h%d.example:80" % index) == f"h{index}.example"
    assert len(framing._HOSTS) <= 1024


def response(
    headers: list[tuple[bytes, bytes]], status: int = 200, *, head: bool = False
) -> str:
    return check_response_head(status, "1.1", headers, head).body


def test_response_body_kinds() -> None:
    assert response([(b"Content-Length", b"10")]) == "length"
    assert response([(b"Content-Length", b"0")]) == "none"
    assert response([(b"Transfer-Encoding", b"chunked")]) == "chunked"
    assert response([]) == "close"


@pytest.mark.parametrize("status", [101, 103, 204, 304])
def test_responses_without_body(status: int) -> None:
    assert response([(b"Content-Length", b"10")], status) == "none"


def test_head_response_has_no_body() -> None:
    info = check_response_head(200, "1.1", [(b"Content-Length", b"10")], True)
    assert info.body == "none"
    assert info.content_length == 10


def test_close_delimited_response_is_not_kept_alive() -> None:
    assert not check_response_head(200, "1.1", [], False).keep_alive


def test_http10_response_closes_unless_keep_alive() -> None:
    plain = check_response_head(200, "1.0", [(b"Content-Length", b"1")], False)
    kept = check_response_head(
        200, "1.0", [(b"Content-Length", b"1"), (b"Connection", b"keep-alive")], False
    )
    assert not plain.keep_alive
    assert kept.keep_alive


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")],
        [(b"Content-Length", b"1"), (b"Content-Length", b"2")],
        [(b"Transfer-Encoding", b"gzip")],
    ],
)
def test_conflicting_response_framing_is_rejected(
    headers: list[tuple[bytes, bytes]],
) -> None:
    with pytest.raises(BadResponseError):
        check_response_head(200, "1.1", headers, False)


@pytest.mark.parametrize("status", [0, 99, 600, 999])
def test_status_outside_100_to_599_is_rejected(status: int) -> None:
    headers = [(b"Content-Length", b"0")]
    with pytest.raises(BadResponseError, match=f"status code {status} is outside"):
        check_response_head(status, "1.1", headers, False)


@pytest.mark.parametrize("status", [100, 200, 599])
def test_status_inside_100_to_599_is_accepted(status: int) -> None:
    info = check_response_head(status, "1.1", [(b"Content-Length", b"0")], False)
    assert info.content_length == 0


# The RFC 9110 / 9112 grammar as regular expressions, written apart from the
# checks in framing.py, which must agree with them byte for byte.
_TOKEN_GRAMMAR = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FIELD_VALUE_GRAMMAR = re.compile(rb"[\t\x20-\x7e\x80-\xff]*\Z")
_ORIGIN_FORM_GRAMMAR = re.compile(rb"/[!-\"$-~]*\Z")


def _random_bytes(rng: random.Random) -> bytes:
    # Mostly bytes near the grammar's edges, some from the whole range.
    edges = b"/aZ09-#@ \t\r\n\x00\x7f\x80\xff:;"
    return bytes(
        rng.choice(edges) if rng.random() < 0.7 else rng.randrange(256)
        for _ in range(rng.randint(0, 6))
    )


def _accepted(check: Callable[..., object], *args: bytes) -> bool:
    try:
        check(*args)
    except FramingError:
        return False
    return True


def test_field_and_target_checks_match_grammar() -> None:
    rng = random.Random(7)
    for _ in range(20_000):
        data = _random_bytes(rng)

        name_ok = _accepted(framing.check_field, data, b"v")
        value_ok = _accepted(framing.check_field, b"X-Name", data)
        target_ok = _accepted(framing.check_target, b"GET", data)

        assert name_ok == bool(_TOKEN_GRAMMAR.match(data)), data
        assert value_ok == bool(_FIELD_VALUE_GRAMMAR.match(data)), data
        if data.startswith(b"/"):
            assert target_ok == bool(_ORIGIN_FORM_GRAMMAR.match(data)), data


def test_lower_field_name_caches_tokens_only() -> None:
    framing._TOKEN_NAMES.clear()

    assert framing.lower_field_name(b"X-Trace-ID") == b"x-trace-id"
    assert framing.lower_field_name(b"Bad Name") == b"bad name"

    assert framing._TOKEN_NAMES == {b"X-Trace-ID": b"x-trace-id"}
    with pytest.raises(FramingError, match="invalid header field name"):
        framing.check_field(b"Bad Name", b"v")
    framing.check_field(b"X-Trace-ID", b"v")


def test_field_name_cache_stays_bounded() -> None:
    framing._TOKEN_NAMES.clear()

    for index in range(framing._MAX_CACHED_TOKENS + 10):
        framing.lower_field_name(b"X-Name-%d" % index)
    framing.lower_field_name(b"X-" + b"a" * framing._MAX_CACHED_TOKEN)

    assert len(framing._TOKEN_NAMES) <= framing._MAX_CACHED_TOKENS
    assert b"X-" + b"a" * framing._MAX_CACHED_TOKEN not in framing._TOKEN_NAMES


def test_byte_map_changes_only_disallowed_bytes() -> None:
    table = byte_map(lambda byte: 0x21 <= byte <= 0x7E)
    changed = [byte for byte in range(256) if table[byte] != byte]
    assert changed == [*range(0x21), *range(0x7F, 256)]


def test_byte_map_check_of_allowed_data_copies_nothing() -> None:
    table = byte_map(lambda byte: 0x21 <= byte <= 0x7E)
    data = bytes(range(0x21, 0x7F))
    assert data.translate(table) is data
    assert b"a b".translate(table) != b"a b"
    assert b"\x00".translate(table) != b"\x00"
