"""Hash key extraction: query arguments as nginx's $arg_NAME, headers, cookies."""

from __future__ import annotations

import zlib

import pytest

from pgproxy.balancing import hash_key_value
from pgproxy.balancing.consistent_hash import key_hash
from pgproxy.balancing.hash_key import HashKey, find_argument, query_value

HEADERS = {"x-user": "alice", "cookie": 'theme=dark; sid="s-1"; other=x'}


def query_key(query: str, name: str = "k") -> str | None:
    return HashKey(f"query:{name}").value({}, "/p", query, "10.0.0.1")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("k=1", "1"),
        ("a=1&k=2", "2"),
        ("k=1&a=2", "1"),
        ("a=1&k=2&b=3", "2"),
        ("K=1", "1"),
        ("a=1&K=2&k=3", "2"),
        ("k=1&k=2", "1"),
        ("k&k=2", "2"),
        ("xk=1&k=2", "2"),
        ("kk=1&k=2", "2"),
        ("a=k=1&k=2", "2"),
        ("k=a=b", "a=b"),
        ("k=a%20b", "a%20b"),
        ("k=%41", "%41"),
        ("&&k=1", "1"),
        ("a=1&", None),
        ("k=", None),
        ("k=&k=2", None),
        ("k", None),
        ("kk=1", None),
        ("", None),
    ],
)
def test_query_key_like_nginx_arg(query: str, expected: str | None) -> None:
    assert query_key(query) == expected


def test_query_key_name_ignores_case() -> None:
    assert query_key("user=1", name="USER") == "1"
    assert query_key("User=1", name="uSeR") == "1"


def test_query_key_matches_split_reference() -> None:
    # The search in the lower-cased query must agree with a split into pairs,
    # also where lowering a non-ASCII query changes its length (İ) or depends
    # on the context (final sigma).
    queries = [
        "k=1",
        "K=x&k=y",
        "a=İ&k=2",
        "İ=1&k=2",
        "ΑΣ=1&k=2",
        "σ=1&Σ=2",
        "Σ=1",
        "aΣ=1&Σ=2",
        "x=ΣΣ&ς=3",
        "é=1&É=2",
    ]
    for name in ("k", "σ", "ς", "é", "i̇", "ασ", "ας"):
        for query in queries:
            expected = query_value(query, name.lower())
            assert query_key(query, name) == (expected or None), (query, name)


def test_separator_in_name_matches_nothing() -> None:
    assert query_key("a=b=1", name="a=b") is None
    assert query_key("a&b=1", name="a&b") is None


def test_find_argument_skips_suffix_matches() -> None:
    assert find_argument("k=1", "k=") == 0
    assert find_argument("xk=1&k=2", "k=") == 5
    assert find_argument("xk=1", "k=") == -1
    assert find_argument("", "k=") == -1


def test_header_key_ignores_name_case() -> None:
    assert HashKey("header:X-User").value(HEADERS, "/p", "", "ip") == "alice"
    assert HashKey("header:x-other").value(HEADERS, "/p", "", "ip") is None


def test_cookie_key() -> None:
    assert HashKey("cookie:sid").value(HEADERS, "/p", "", "ip") == "s-1"
    assert HashKey("cookie:theme").value(HEADERS, "/p", "", "ip") == "dark"
    assert HashKey("cookie:SID").value(HEADERS, "/p", "", "ip") is None
    assert HashKey("cookie:sid").value({}, "/p", "", "ip") is None


def test_path_and_client_ip_keys() -> None:
    assert HashKey("path").value({}, "/a/b", "k=1", "10.0.0.9") == "/a/b"
    assert HashKey("client_ip").value({}, "/a/b", "k=1", "10.0.0.9") == "10.0.0.9"
    assert HashKey("client_ip").value({}, "/a/b", "k=1", "") is None


def test_invalid_spec_rejected() -> None:
    with pytest.raises(ValueError, match='invalid hash key "body:x"'):
        HashKey("body:x")


def test_hash_key_value_uses_spec() -> None:
    assert hash_key_value("query:k", {}, "/p", "a=1&k=2", "ip") == "2"
    assert hash_key_value("header:x-user", HEADERS, "/p", "", "ip") == "alice"
    with pytest.raises(ValueError, match="invalid hash key"):
        hash_key_value("nothing", {}, "/p", "", "ip")


@pytest.mark.parametrize(
    "raw",
    [b"caf\xc3\xa9", b"caf\xe9", b"plain"],
    ids=["utf-8", "not-utf-8", "ascii"],
)
def test_header_key_hashes_wire_bytes(raw: bytes) -> None:
    # The proxy decodes header bytes as latin-1, and nginx hashes the raw bytes.
    headers = {"x-user": raw.decode("latin-1")}
    key = HashKey("header:x-user").value(headers, "/p", "", "ip")
    assert key is not None
    assert key_hash(key) == zlib.crc32(raw)


def test_cookie_key_hashes_wire_bytes() -> None:
    headers = {"cookie": b"sid=\xc3\xa9t\xc3\xa9".decode("latin-1")}
    key = HashKey("cookie:sid").value(headers, "/p", "", "ip")
    assert key is not None
    assert key_hash(key) == zlib.crc32("été".encode())
