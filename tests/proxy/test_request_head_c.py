"""The C request head check against the Python check it must agree with.

pgproxy/proxy/_request_head.c may return None for any head, but when it
accepts one, `check_request_head_python` must accept it too and return the
same RequestInfo. A seeded corpus of mutated heads, shaped like request
smuggling attempts, compares the two. Other tests check that the C check
accepts the common heads, its argument errors and its reference counts.
"""

from __future__ import annotations

import random
import sys
import tracemalloc

import pytest

from pgproxy.proxy.framing import (
    COMMON_CONNECTION_TOKENS,
    FramingError,
    RequestInfo,
    check_request_head_c,
    check_request_head_python,
    lower_names,
)

c_check = pytest.importorskip("pgproxy.proxy._request_head")

Headers = list[tuple[bytes, bytes]]
HOST = (b"Host", b"example.com")
# Heads that the C check accepts as they are: method, target, version, fields.
COMMON: list[tuple[bytes, bytes, str, Headers]] = [
    (b"GET", b"/", "1.1", [HOST]),
    (
        b"GET",
        b"/static/app.js?v=3&x=%20",
        "1.1",
        [
            (b"Host", b"example.com:8080"),
            (b"User-Agent", b"curl/8.5.0"),
            (b"Accept", b"*/*"),
        ],
    ),
    (
        b"POST",
        b"/api/orders",
        "1.1",
        [
            (b"Host", b"api.example.com"),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", b"42"),
            (b"Idempotency-Key", b"4f1c9a"),
            (b"Connection", b"keep-alive"),
        ],
    ),
    (
        b"PUT",
        b"/upload",
        "1.1",
        [
            (b"host", b"[::1]:8443"),
            (b"content-length", b"000123"),
            (b"expect", b"100-continue"),
        ],
    ),
    (b"GET", b"/", "1.1", [HOST, (b"Connection", b"close")]),
    (b"GET", b"/", "1.0", []),
    (b"GET", b"/old", "1.0", [HOST, (b"Connection", b"Keep-Alive")]),
    (b"POST", b"/", "1.0", [HOST, (b"Expect", b"100-continue"), (b"X", b"")]),
    (b"GET", b"/", "1.1", [(b"Host", b" example.com\t"), (b"X-A", b"caf\xe9\tok")]),
]
# Names that the checks treat differently from other fields, and names close
# to them.
SPECIAL_NAMES = (
    b"Host",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"Expect",
    b"Upgrade",
    b"Idempotency-Key",
    b"Proxy-Connection",
    b"Keep-Alive",
    b"Hosts",
    b"Content-Length ",
    b" Host",
    b"Host\x00",
)
SPECIAL_VALUES = (
    b"",
    b"0",
    b"42",
    b" 42",
    b"42, 42",
    b"+42",
    b"0x10",
    b"999999999999999999",  # 18 digits, the longest length read without a split
    b"1000000000000000000",  # 19 digits
    b"9" * 40,
    b"chunked",
    b"gzip, chunked",
    b"keep-alive",
    b"Keep-Alive",
    b"close",
    b"CLOSE",
    b"upgrade",
    b"close, keep-alive",
    b"keep-alive ",
    b"100-continue",
    b"100-Continue ",
    b"200-ok",
    b"websocket",
    b"example.com",
    b"other.example",
    b"EXAMPLE.com:80",
    b"user@example.com",
    b"example.com/x",
    b"exa mple.com",
    b"[::1]",
)
TARGETS = (
    b"/",
    b"*",
    b"",
    b"a",
    b"//evil",
    b"/a#frag",
    b"/a b",
    b"http://example.com/a",
    b"http://other.example/a",
    b"HTTPS://Example.com?q",
    b"http://user@example.com/",
    b"example.com:443",
)
VERSIONS = ("1.1", "1.0", "1.2", "2.0", "0.9", "1.1 ", "")
METHODS = (b"GET", b"POST", b"OPTIONS", b"CONNECT")
# Bytes that break HTTP syntax: CR, LF, NUL, DEL, obs-text, SP, HTAB, and
# the separators of names, lists and authorities.
INSERTED = b"\r\n\x00\x7f\x80\xff \t:,@/#"


def request_info_fields(info: RequestInfo | None) -> dict[str, object] | None:
    """Return every public attribute of a RequestInfo, by name."""
    if info is None:
        return None
    return {name: getattr(info, name) for name in dir(info) if not name.startswith("_")}


def _odd_case(rng: random.Random, name: bytes) -> bytes:
    return bytes(
        byte ^ 0x20 if chr(byte).isalpha() and rng.random() < 0.5 else byte
        for byte in name
    )


def _change_bytes(rng: random.Random, data: bytes) -> bytes:
    """Flip a bit, insert a byte that breaks syntax, delete or truncate."""
    buffer = bytearray(data)
    where = rng.randrange(len(buffer) + 1)
    action = rng.randrange(4)
    if action == 0 and where < len(buffer):
        buffer[where] ^= 1 << rng.randrange(8)
    elif action == 1 or where == len(buffer):
        buffer.insert(where, INSERTED[rng.randrange(len(INSERTED))])
    elif action == 2:
        del buffer[where]
    else:
        del buffer[where:]
    return bytes(buffer)


def _change_fields(rng: random.Random, headers: Headers) -> Headers:
    """Add, duplicate, reorder, or change one field, by name or by bytes."""
    headers = list(headers)
    action = rng.randrange(5)
    if action == 0 or not headers:
        name = _odd_case(rng, rng.choice(SPECIAL_NAMES))
        field = (name, rng.choice(SPECIAL_VALUES))
        headers.insert(rng.randrange(len(headers) + 1), field)
    elif action == 1:
        headers.insert(rng.randrange(len(headers) + 1), rng.choice(headers))
    elif action == 2:
        rng.shuffle(headers)
    else:
        where = rng.randrange(len(headers))
        name, value = headers[where]
        if action == 3:
            name = _change_bytes(rng, name)
        else:
            value = _change_bytes(rng, value)
        headers[where] = (name, value)
    return headers


def mutate(
    rng: random.Random, method: bytes, target: bytes, version: str, headers: Headers
) -> tuple[bytes, bytes, str, Headers]:
    """Apply one to three random changes to a head."""
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.6:
            headers = _change_fields(rng, headers)
        elif kind < 0.75:
            target = _change_bytes(rng, target)
        elif kind < 0.85:
            target = rng.choice(TARGETS)
        elif kind < 0.95:
            version = rng.choice(VERSIONS)
        else:
            method = rng.choice(METHODS)
    return method, target, version, headers


def compare(
    method: bytes,
    target: bytes,
    version: str,
    headers: Headers,
    names: list[bytes] | None,
) -> tuple[bool, bool]:
    """Check one head with both checks and assert that they agree.

    Return whether the C check accepted it and whether Python rejected it.
    """
    found = check_request_head_c(c_check.check_head, target, version, headers, names)
    try:
        expected = check_request_head_python(method, target, version, headers, names)
    except FramingError:
        assert found is None, (method, target, version, headers)
        return False, True
    if found is not None:
        assert request_info_fields(found) == request_info_fields(expected), (
            method,
            target,
            version,
            headers,
        )
    return found is not None, False


def compare_corpus(seed: int, count: int) -> tuple[int, int]:
    """Check `count` mutated heads with both checks and assert that they agree.

    Return the number of heads the C check accepted and the number that the
    Python check rejected.
    """
    rng = random.Random(seed)
    accepted = rejected = 0
    for _ in range(count):
        head = mutate(rng, *rng.choice(COMMON))
        names = lower_names(head[3]) if rng.random() < 0.7 else None
        c_accepted, python_rejected = compare(*head, names)
        accepted += c_accepted
        rejected += python_rejected
    return accepted, rejected


def test_checks_agree_on_mutated_heads() -> None:
    accepted, rejected = compare_corpus(seed=20261205, count=40000)
    # Both outcomes must be common, or the comparison means little.
    assert accepted > 5000
    assert rejected > 5000


def test_c_check_accepts_common_heads() -> None:
    for method, target, version, headers in COMMON:
        for names in (lower_names(headers), None):
            accepted, rejected = compare(method, target, version, headers, names)
            assert accepted, headers
            assert not rejected, headers


def test_checks_agree_on_every_value_byte() -> None:
    # The C check reads values 8 bytes at a time: put each byte value at each
    # place of a word, in a value long enough for several words.
    for byte in range(256):
        for place in range(17):
            value = bytearray(b"abcdefghijklmnopqrstuvwx")
            value[place] = byte
            headers = [HOST, (b"X-A", bytes(value))]
            compare(b"GET", b"/", "1.1", headers, lower_names(headers))


def test_checks_agree_on_every_name_and_target_byte() -> None:
    for byte in range(256):
        name = b"X-" + bytes([byte]) + b"y"
        headers = [HOST, (name, b"v")]
        compare(b"GET", b"/", "1.1", headers, lower_names(headers))
        compare(b"GET", b"/a" + bytes([byte]), "1.1", [HOST], None)


def test_c_check_leaves_short_names_list_to_python() -> None:
    headers = [HOST, (b"Accept", b"*/*")]

    found = c_check.check_head(
        b"/", "1.1", headers, [b"host"], COMMON_CONNECTION_TOKENS
    )

    assert found is None


def test_c_check_leaves_other_types_to_python() -> None:
    heads = [
        (bytearray(b"/"), "1.1", [HOST], None),
        (b"/", b"1.1", [HOST], None),
        (b"/", "1.1", (HOST,), None),
        (b"/", "1.1", [[b"Host", b"example.com"]], None),
        (b"/", "1.1", [(b"Host", b"example.com", b"")], None),
        (b"/", "1.1", [(b"Host", "example.com")], None),
        (b"/", "1.1", [HOST], [1]),
        (b"/", "1.1", [HOST], (b"host",)),
    ]
    for head in heads:
        found = c_check.check_head(*head[:4], COMMON_CONNECTION_TOKENS)
        assert found is None, head


def test_c_check_returns_connection_options_object() -> None:
    headers = [HOST, (b"Connection", b"Keep-Alive")]

    found = c_check.check_head(b"/", "1.1", headers, None, COMMON_CONNECTION_TOKENS)

    assert found is not None
    assert found[3] is COMMON_CONNECTION_TOKENS[b"Keep-Alive"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((b"/", "1.1", [HOST], None, []), "connection_tokens must be a dict"),
        ((b"/", "1.1", [HOST], None), "takes 5 arguments"),
    ],
)
def test_c_check_rejects_wrong_arguments(
    arguments: tuple[object, ...], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        c_check.check_head(*arguments)


def test_c_check_keeps_reference_counts() -> None:
    options = COMMON_CONNECTION_TOKENS[b"close"]
    host = b"example.com"
    target = b"/a"
    headers = [(b"Host", host), (b"Connection", b"close")]
    before = (sys.getrefcount(options), sys.getrefcount(host), sys.getrefcount(target))
    for _ in range(1000):
        found = c_check.check_head(
            target, "1.1", headers, None, COMMON_CONNECTION_TOKENS
        )
        assert found is not None
    del found

    after = (sys.getrefcount(options), sys.getrefcount(host), sys.getrefcount(target))
    assert after == before


def test_c_check_frees_what_it_built() -> None:
    # Heads accepted, with a stripped Host and a length built, and heads
    # left to Python after their fields were read.
    heads: list[tuple[str, Headers]] = [
        ("1.1", [(b"Host", b" example.com "), (b"Content-Length", b"12345")]),
        ("1.0", [(b"Connection", b"keep-alive")]),
        ("1.1", [(b"Content-Length", b"1")]),
        ("1.1", [HOST, (b"Upgrade", b"websocket")]),
    ]

    def run() -> None:
        for version, headers in heads:
            c_check.check_head(b"/", version, headers, None, COMMON_CONNECTION_TOKENS)

    run()  # allocations that stay, such as cached small ints
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(2000):
            run()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # A leak of one object per call would hold 8,000 objects, over 250 KB.
    assert end - start < 10_000
