"""Path normalisation before routing: decoding, dot segments, merged slashes."""

from __future__ import annotations

import random

import pytest

from pgproxy.graph.paths import (
    InvalidPathError,
    encode_path,
    needs_normalizing,
    normalize_path,
)


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
