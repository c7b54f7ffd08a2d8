"""Path normalisation before routing, and the ambiguous spellings a listener rejects."""

from __future__ import annotations

import random
import typing

import pytest

from pgproxy.config.fields import AmbiguousPathName
from pgproxy.graph.paths import (
    AMBIGUOUS_NAMES,
    AMBIGUOUS_SPELLINGS,
    AmbiguousPathRule,
    InvalidPathError,
    encode_path,
    needs_normalizing,
    normalize_path,
)

ALL_NAMES = AMBIGUOUS_NAMES


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/%2e%2e/admin", "/admin"),
        ("/public/..%2Fadmin", "/admin"),
        ("/public/%2e%2e%2fadmin", "/admin"),
        ("/x/../admin", "/admin"),
        ("/./admin", "/admin"),
        ("//admin", "/admin"),
        ("/admin//users/", "/admin/users/"),
        ("/a/b/c/./../../g", "/a/g"),  # RFC 3986 section 5.4.2
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/..", "/"),
        ("/../../etc/passwd", "/etc/passwd"),
        ("/a/.../b", "/a/.../b"),  # "..." is an ordinary segment
        ("/a/..b/c", "/a/..b/c"),
        ("/caf%C3%A9", "/café"),
        ("/%2561", "/%61"),  # decoded once, as nginx does
        ("/a%20b", "/a b"),
        ("*", "*"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize("raw", ["/%", "/%4", "/%zz", "/a%g1", "/%00", "/a%2500%"])
def test_invalid_escapes_and_nul_are_rejected(raw: str) -> None:
    with pytest.raises(InvalidPathError):
        normalize_path(raw)


def test_plain_paths_are_returned_as_they_are() -> None:
    path = "/api/v1/users/42"
    assert not needs_normalizing(path)
    assert normalize_path(path) is path


def test_encode_keeps_path_characters_and_escapes_the_rest() -> None:
    assert encode_path("/a b/café/x;y=1:@!~") == "/a%20b/caf%C3%A9/x;y=1:@!~"
    assert encode_path("/%zz") == "/%25zz"
    # Bytes that were not UTF-8 come back exactly as they were sent.
    assert encode_path(normalize_path("/%FF%FE")) == "/%FF%FE"


def test_random_paths_keep_their_invariants() -> None:
    rng = random.Random(7)
    alphabet = ["a", "b", "/", ".", "%2e", "%2F", "%61", "//", "..", "~"]
    for _ in range(2000):
        raw = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        result = normalize_path(raw)
        assert result.startswith("/")
        assert "//" not in result
        segments = result.split("/")
        assert "." not in segments, (raw, result)
        assert ".." not in segments, (raw, result)
        # Without escapes left in it, a result is its own normal form.
        if "%" not in result:
            assert normalize_path(result) == result


def test_spelling_names_match_the_config_names() -> None:
    assert ALL_NAMES == typing.get_args(AmbiguousPathName)


@pytest.mark.parametrize(
    ("path", "name", "text"),
    [
        ("/admin;x", "semicolon", ";"),
        ("/admin;jsessionid=1/x", "semicolon", ";"),
        ("/admin%3Bx", "semicolon", "%3B"),
        ("/admin%3bx", "semicolon", "%3b"),
        ("/admin\\x", "backslash", "\\"),
        ("\\admin", "backslash", "\\"),
        ("/admin%5Cx", "backslash", "%5C"),
        ("/admin%5cx", "backslash", "%5c"),
        ("/admin%2Fx", "escaped_slash", "%2F"),
        ("/x/..%2fadmin", "escaped_slash", "%2f"),
        ("/%252F", "escaped_percent", "%25"),
        ("/%2561dmin", "escaped_percent", "%25"),
        ("/a%2Fb;c", "escaped_slash", "%2F"),  # the first spelling in the path
        ("/a;b%2Fc", "semicolon", ";"),
        ("/public/..%C0%AFadmin", "overlong_utf8", "%C0%AF"),
        ("/public/%c0%ae%c0%ae/admin", "overlong_utf8", "%c0%ae"),
        ("/a%C1%9Cb", "overlong_utf8", "%C1%9C"),  # backslash
        ("/a%C0%80b", "overlong_utf8", "%C0%80"),  # NUL
        ("/a%E0%80%AFb", "overlong_utf8", "%E0%80%AF"),
        ("/a%e0%80%aeb", "overlong_utf8", "%e0%80%ae"),
        ("/a%E0%9F%BFb", "overlong_utf8", "%E0%9F%BF"),  # U+07FF in 3 bytes
        ("/a%F0%80%80%AFb", "overlong_utf8", "%F0%80%80%AF"),
        ("/a%F0%8F%BF%BFb", "overlong_utf8", "%F0%8F%BF%BF"),  # U+FFFF in 4 bytes
        ("/a%F8%80%80%80%AFb", "overlong_utf8", "%F8%80%80%80%AF"),
        ("/a%FC%80%80%80%80%AFb", "overlong_utf8", "%FC%80%80%80%80%AF"),
        ("/a%C0%AF%80b", "overlong_utf8", "%C0%AF"),  # the sequence, not the byte after
        ("/a%E0%80b", "overlong_utf8", "%E0%80"),  # cut short, still overlong
        ("/a%C0%AF%2Fb", "overlong_utf8", "%C0%AF"),
    ],
)
def test_rule_finds_each_spelling(path: str, name: str, text: str) -> None:
    assert AmbiguousPathRule(ALL_NAMES).find(path) == (name, text)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/admin",
        "/a%20b/caf%C3%A9",
        "/%2E%2E/admin",
        "/a%3Ab%5Dc%2Dd",  # escapes that only look like listed ones
        "/%3",
        # The shortest UTF-8 forms of the first code points of 2, 3 and 4 bytes.
        "/%C2%80/%E0%A0%80/%F0%90%80%80",
        "/%C2%AF/%DF%BF/%EF%BF%BF",
        "/%C0/%C1/%E0/%F0",  # invalid lead bytes alone: no character to read
        "/%F8%88%80%80%80/%FC%84%80%80%80%80",  # 5 and 6 bytes, not overlong
        "/2F/5C/3B/25",
        "*",
    ],
)
def test_rule_passes_unambiguous_paths(path: str) -> None:
    assert AmbiguousPathRule(ALL_NAMES).find(path) is None


def test_rule_finds_only_the_names_listed() -> None:
    paths = {
        "semicolon": "/a;b",
        "backslash": "/a%5Cb",
        "escaped_slash": "/a%2fb",
        "escaped_percent": "/a%2541",
        "overlong_utf8": "/a%C0%AFb",
    }
    for listed in ALL_NAMES:
        rule = AmbiguousPathRule([listed])
        for name, path in paths.items():
            found = rule.find(path)
            if name == listed:
                assert found is not None, (listed, path)
                assert found[0] == listed
            else:
                assert found is None, (listed, path)


def test_double_encoded_slash_is_not_an_escaped_slash() -> None:
    # Routes and an upstream that decodes once both read `%252F` as the
    # text `%2F`; only an upstream that decodes twice reads a slash.
    assert AmbiguousPathRule(["escaped_slash"]).find("/a%252Fb") is None
    assert normalize_path("/a%252Fb") == "/a%2Fb"
    assert AmbiguousPathRule(["escaped_percent"]).find("/a%252Fb") == (
        "escaped_percent",
        "%25",
    )


def test_rule_lists_each_name_once() -> None:
    rule = AmbiguousPathRule(["semicolon", "backslash", "semicolon"])
    assert rule.names == ("semicolon", "backslash")
    assert repr(rule) == "<AmbiguousPathRule semicolon backslash>"


@pytest.mark.parametrize("names", [[], ["encoded_slash"], ["semicolon", "Semicolon"]])
def test_rule_rejects_unknown_or_no_names(names: list[str]) -> None:
    with pytest.raises(
        ValueError, match="expected one or more of semicolon, backslash"
    ):
        AmbiguousPathRule(names)


def test_rule_agrees_with_a_plain_substring_search() -> None:
    rng = random.Random(11)
    alphabet = ["a", "/", ";", "\\", "%", "2", "5", "3", "F", "f", "c", "C", "B", "b"]
    fixed_names = tuple(AMBIGUOUS_SPELLINGS)
    for _ in range(3000):
        names = rng.sample(fixed_names, rng.randint(1, len(fixed_names)))
        path = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        spellings = [s for name in names for s in AMBIGUOUS_SPELLINGS[name]]
        expected = any(s.upper() in path.upper() for s in spellings)
        found = AmbiguousPathRule(names).find(path)
        assert (found is not None) == expected, (names, path, found)
        if found is not None:
            assert found[0] in names
            assert found[1].upper() in AMBIGUOUS_SPELLINGS[found[0]]


def _utf8_form(code_point: int, length: int) -> str:
    """Return `code_point` in the `length`-byte form of RFC 2279, escaped."""
    if length == 1:
        return f"%{code_point:02X}"
    lead = (0xFF << (8 - length)) & 0xFF | code_point >> (6 * (length - 1))
    tail = [0x80 | (code_point >> (6 * i)) & 0x3F for i in reversed(range(length - 1))]
    return "".join(f"%{byte:02X}" for byte in [lead, *tail])


# The largest code point that each length of RFC 2279 can encode.
_MAX_BY_LENGTH = {
    1: 0x7F,
    2: 0x7FF,
    3: 0xFFFF,
    4: 0x1FFFFF,
    5: 0x3FFFFFF,
    6: 0x7FFFFFFF,
}


def test_overlong_forms_are_found_and_shortest_pass() -> None:
    rule = AmbiguousPathRule(["overlong_utf8"])
    code_points = [*range(0x80), 0x80, 0x7FF, 0x800, 0xFFFF, 0x10000, 0x10FFFF]
    code_points += [0x1FFFFF, 0x200000, 0x3FFFFFF, 0x4000000]
    for code_point in code_points:
        shortest = min(n for n, top in _MAX_BY_LENGTH.items() if code_point <= top)
        path = "/a" + _utf8_form(code_point, shortest) + "b"
        assert rule.find(path) is None, (code_point, path)
        for length in range(shortest + 1, 7):
            escaped = _utf8_form(code_point, length)
            found = rule.find("/a" + escaped + "b")
            assert found == ("overlong_utf8", escaped), (code_point, length)
