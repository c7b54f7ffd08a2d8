"""SourceMap: key paths to line and column, across TOML's ways to write keys."""

from __future__ import annotations

import pytest
import tomllib

from pgproxy.config.sourcemap import SourceMap, format_key_path, parse_key_path

SOURCE = """\
#:schema ./pgproxy.schema.json
[server]
workers = 2  # [not.a.table]
trusted_proxies = [
  "10.0.0.0/8",  # comment = "inside"
  "192.168.0.0/16",
]

[listeners.public]
address = "0.0.0.0:8080"
tls = { certificate = "cert.pem", private_key = "key.pem" }

[listeners."edge.v2"]
address = '[::]:8443'

[[routes]]
name = \"\"\"
[fake.header]
cluster = "not a key"\"\"\"
headers = { x-canary = "1", "x y" = "2" }
cluster = "api"

[[routes]]
respond.status = 503
respond.body = 'down'

[[routes]]
path = "/x"

[routes.respond]
status = 204

[clusters.api]
endpoints = ["10.0.0.1:80", { address = "10.0.0.2:80", weight = 2 }]
started = 1979-05-27 07:32:00Z
"quoted key" = 1

[clusters.api.health_check]
path = "/healthz"

[[clusters.pool.endpoints]]
address = "10.0.1.1:80"

[[clusters.pool.endpoints]]
address = "10.0.1.2:80"
weight = 3
"""


@pytest.fixture(scope="module")
def source_map() -> SourceMap:
    tomllib.loads(SOURCE)  # the fixture itself must be valid TOML
    return SourceMap(SOURCE)


@pytest.mark.parametrize(
    ("key_path", "line", "column"),
    [
        ("server", 2, 1),
        ("server.workers", 3, 1),
        ("server.trusted_proxies", 4, 1),
        ("server.trusted_proxies[1]", 6, 3),
        ("listeners.public", 9, 1),
        ("listeners.public.address", 10, 1),
        ("listeners.public.tls.private_key", 11, 35),
        ('listeners."edge.v2"', 13, 1),
        ('listeners."edge.v2".address', 14, 1),
        ("routes", 16, 3),
        ("routes[0]", 16, 1),
        ("routes[0].name", 17, 1),
        ("routes[0].headers.x-canary", 20, 13),
        ('routes[0].headers."x y"', 20, 29),
        ("routes[0].cluster", 21, 1),
        ("routes[1]", 23, 1),
        ("routes[1].respond", 24, 1),
        ("routes[1].respond.status", 24, 9),
        ("routes[1].respond.body", 25, 9),
        ("routes[2].path", 28, 1),
        ("routes[2].respond", 30, 1),
        ("routes[2].respond.status", 31, 1),
        ("clusters.api.endpoints[0]", 34, 14),
        ("clusters.api.endpoints[1]", 34, 29),
        ("clusters.api.endpoints[1].weight", 34, 56),
        ("clusters.api.started", 35, 1),
        ('clusters.api."quoted key"', 36, 1),
        ("clusters.api.health_check.path", 39, 1),
        ("clusters.pool", 41, 12),
        ("clusters.pool.endpoints[0]", 41, 1),
        ("clusters.pool.endpoints[1].address", 45, 1),
        ("clusters.pool.endpoints[1].weight", 46, 1),
    ],
)
def test_locate_key(
    source_map: SourceMap, key_path: str, line: int, column: int
) -> None:
    assert source_map.locate(key_path)[:2] == (line, column)


@pytest.mark.parametrize(
    ("key_path", "line", "column"),
    [
        ("server.workers", 3, 11),
        ("listeners.public.address", 10, 11),
        ("listeners.public.tls.private_key", 11, 49),
        ("routes[1].respond.status", 24, 18),
        ("clusters.api.endpoints[1].weight", 34, 65),
        ("clusters.api.endpoints[1]", 34, 29),
    ],
)
def test_locate_value(
    source_map: SourceMap, key_path: str, line: int, column: int
) -> None:
    assert source_map.locate_value(key_path)[:2] == (line, column)


def test_locate_returns_source_line(source_map: SourceMap) -> None:
    assert source_map.locate("listeners.public.address") == (
        10,
        1,
        'address = "0.0.0.0:8080"',
    )


def test_keys_inside_strings_are_not_keys(source_map: SourceMap) -> None:
    # "[fake.header]" and 'cluster = ...' on lines 18-19 are inside a string.
    assert source_map.locate("fake")[:2] == (1, 1)
    assert source_map.locate("routes[0].cluster")[:2] == (21, 1)


def test_missing_key_falls_back_to_parent(source_map: SourceMap) -> None:
    assert source_map.locate("listeners.public.idle_timeout")[:2] == (9, 1)
    assert source_map.locate("routes[2].cluster")[:2] == (27, 1)
    assert source_map.locate("clusters.api.health_check.timeout")[:2] == (38, 1)


def test_unknown_path_maps_to_first_line(source_map: SourceMap) -> None:
    assert source_map.locate("nothing.here") == (1, 1, "#:schema ./pgproxy.schema.json")
    assert source_map.locate("")[:2] == (1, 1)
    assert source_map.locate("not a [path")[:2] == (1, 1)


def test_value_of_missing_key_falls_back_to_key(source_map: SourceMap) -> None:
    assert source_map.locate_value("routes[2].cluster")[:2] == (27, 1)


def test_crlf_line_endings() -> None:
    text = "[listeners.a]\r\naddress = 1\r\n"
    source_map = SourceMap(text)

    assert source_map.locate_value("listeners.a.address") == (2, 11, "address = 1")


def test_columns_count_characters() -> None:
    source_map = SourceMap('name = "é"\n"ключ" = "ü"\nx = 1\n')

    assert format_key_path(["ключ"]) == '"ключ"'
    assert source_map.locate('"ключ"')[:2] == (2, 1)
    assert source_map.locate_value('"ключ"')[:2] == (2, 10)


def test_tabs_and_dotted_keys_with_spaces() -> None:
    source_map = SourceMap("[a]\n\tb . c\t= 1\n")

    assert source_map.locate("a.b")[:2] == (2, 2)
    assert source_map.locate("a.b.c")[:2] == (2, 6)


def test_explicit_table_after_implicit() -> None:
    source_map = SourceMap("[a.b.c]\nx = 1\n[a]\ny = 2\n")

    assert source_map.locate("a")[:2] == (3, 1)
    assert source_map.locate("a.b")[:2] == (1, 4)


def test_nested_arrays_of_tables() -> None:
    text = "[[r]]\n[[r.s]]\nx = 1\n[[r]]\n[[r.s]]\n[[r.s]]\nx = 2\n"
    tomllib.loads(text)
    source_map = SourceMap(text)

    assert source_map.locate("r[1].s[1]")[:2] == (6, 1)
    assert source_map.locate("r[1].s[1].x")[:2] == (7, 1)
    assert source_map.locate("r[0].s[0].x")[:2] == (3, 1)


def test_invalid_toml_does_not_raise() -> None:
    source_map = SourceMap('[a\nb = "open\nc = [1, {\n[[d]]\ne.f = \n')

    assert source_map.locate("a.b")[:2] == (2, 1)
    # The unclosed array swallows the rest, so "d" falls back to the root.
    assert source_map.locate("d[0]")[:2] == (1, 1)


def test_find_duplicate() -> None:
    source_map = SourceMap("[a]\nx = 1\ny = 2\nx = 3\n[a]\n")

    assert source_map.find_duplicate(4) == ("a.x", 1, 2)
    assert source_map.find_duplicate(5) == ("a", 1, 1)
    assert source_map.find_duplicate(3) is None


def test_scan_is_lazy() -> None:
    source_map = SourceMap("a = 1\n")

    assert "unscanned" in repr(source_map)
    source_map.locate("a")
    assert "1 keys" in repr(source_map)


def test_source_line_bounds() -> None:
    source_map = SourceMap("a = 1\n")

    assert source_map.source_line(1) == "a = 1"
    assert source_map.source_line(0) is None
    assert source_map.source_line(3) is None


@pytest.mark.parametrize(
    ("parts", "text"),
    [
        (("listeners", "public", "address"), "listeners.public.address"),
        (("routes", 2, "cluster"), "routes[2].cluster"),
        (
            ("clusters", "api.v1", "endpoints", 1, "weight"),
            'clusters."api.v1".endpoints[1].weight',
        ),
        (("routes", 0, "headers", "x y"), 'routes[0].headers."x y"'),
        (("a", 'q"uote'), 'a."q\\"uote"'),
        ((), ""),
    ],
)
def test_key_path_round_trip(parts: tuple[str | int, ...], text: str) -> None:
    assert format_key_path(parts) == text
    assert parse_key_path(text) == parts


def test_parse_key_path_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="invalid key path"):
        parse_key_path("a..b")
