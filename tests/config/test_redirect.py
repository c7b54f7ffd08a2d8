"""Config checks of `redirect` routes."""

from __future__ import annotations

import pytest

from pgproxy.config.diagnostics import Diagnostic
from pgproxy.config.loader import parse_config
from pgproxy.errors import ConfigError
from pgproxy.graph.build import build_graph
from pgproxy.graph.settings import RedirectSettings

HEAD = """[listeners.public]
address = "127.0.0.1:8080"

[clusters.api]
endpoints = ["127.0.0.1:9000"]

[[routes]]
"""


def errors_of(text: str) -> list[Diagnostic]:
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + text, "t.toml")
    return caught.value.diagnostics


def test_redirect_reaches_the_route() -> None:
    config, _ = parse_config(
        HEAD + 'redirect = { scheme = "https", status = 308 }\n', "t.toml"
    )
    graph, problems = build_graph(config, "t.toml")

    assert graph is not None, problems
    [route] = graph.routes
    assert route.redirect == RedirectSettings(308, "https", None, None, None, False)
    assert route.cluster is None


def test_redirect_to_same_url_is_rejected() -> None:
    [error] = errors_of("redirect = { strip_query = true }\n")

    assert error.code == "missing-key"
    assert error.key == "routes[0].redirect.scheme"
    assert "would loop" in error.message


def test_redirect_and_cluster_conflict() -> None:
    [error] = errors_of('cluster = "api"\nredirect = { scheme = "https" }\n')

    assert error.code == "conflicting-keys"
    assert error.key == "routes[0].redirect"
    assert 'set one of "cluster", "respond" and "redirect"' in error.message


def test_route_without_target_names_all_three() -> None:
    [error] = errors_of('path = "/x"\n')

    assert error.code == "missing-key"
    assert '"cluster", "respond" or "redirect"' in error.message


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('redirect = { host = "a.test:443" }\n', "host", "without a port"),
        ('redirect = { host = "a b" }\n', "host", "invalid redirect host"),
        ('redirect = { path = "docs" }\n', "path", 'must start with "/"'),
        ('redirect = { path = "/a b" }\n', "path", "percent-encode"),
        ('redirect = { path = "/a?b" }\n', "path", "URL path characters"),
        ("redirect = { status = 200 }\n", "status", ""),
        ("redirect = { port = 0, scheme = 'https' }\n", "port", ""),
    ],
)
def test_invalid_redirect_parts(text: str, key: str, fragment: str) -> None:
    [error] = errors_of(text)

    assert error.key == f"routes[0].redirect.{key}"
    assert fragment in error.message


def test_https_redirect_on_plain_listener_is_fine() -> None:
    config, _ = parse_config(HEAD + 'redirect = { scheme = "https" }\n', "t.toml")

    graph, problems = build_graph(config, "t.toml")

    assert graph is not None
    assert "redirect-loop" not in [problem.code for problem in problems]


def test_http_redirect_on_plain_listener_warns_loop() -> None:
    config, _ = parse_config(HEAD + 'redirect = { scheme = "http" }\n', "t.toml")

    _, problems = build_graph(config, "t.toml")

    [warning] = [problem for problem in problems if problem.code == "redirect-loop"]
    assert warning.key == "routes[0].redirect"
    assert warning.severity.value == "warning"
