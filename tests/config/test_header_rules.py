"""Config checks of route `request_headers` and `response_headers` rules."""

from __future__ import annotations

import pytest

from pgproxy.config.diagnostics import Diagnostic
from pgproxy.config.loader import parse_config
from pgproxy.errors import ConfigError
from pgproxy.graph.build import build_graph
from pgproxy.graph.settings import HeaderRulesSettings
from pgproxy.graph.types import Graph

HEAD = """[listeners.public]
address = "127.0.0.1:8080"

[clusters.api]
endpoints = ["127.0.0.1:9000"]

[[routes]]
cluster = "api"
"""


def graph_of(text: str) -> Graph:
    config, _ = parse_config(HEAD + text, "t.toml")
    graph, problems = build_graph(config, "t.toml")
    assert graph is not None, problems
    return graph


def build_errors(text: str) -> list[Diagnostic]:
    """Return the errors that building the graph of HEAD + `text` reports."""
    config, _ = parse_config(HEAD + text, "t.toml")
    _, problems = build_graph(config, "t.toml")
    return [problem for problem in problems if problem.severity.value == "error"]


def errors_of(text: str) -> list[Diagnostic]:
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + text, "t.toml")
    return caught.value.diagnostics


def test_rules_reach_the_route() -> None:
    [route] = graph_of(
        'request_headers = { set = { X-Env = "prod" }, remove = ["x-debug"] }\n'
        'response_headers = { add = { X-Frame-Options = "DENY" } }\n'
    ).routes

    assert route.request_headers == HeaderRulesSettings(
        set=(("X-Env", "prod"),), add=(), remove=("x-debug",)
    )
    assert route.response_headers == HeaderRulesSettings(
        set=(), add=(("X-Frame-Options", "DENY"),), remove=()
    )


def test_empty_rules_are_none() -> None:
    [route] = graph_of("response_headers = {}\n").routes

    assert route.response_headers is None
    assert route.request_headers is None


@pytest.mark.parametrize(
    ("table", "name"),
    [
        ("request_headers", "Host"),
        ("request_headers", "X-Forwarded-For"),
        ("request_headers", "transfer-encoding"),
        ("response_headers", "Content-Length"),
        ("response_headers", "Connection"),
        ("response_headers", "via"),
    ],
)
def test_own_fields_are_rejected(table: str, name: str) -> None:
    [error] = build_errors(f'{table} = {{ set = {{ {name} = "x" }} }}\n')

    assert error.code == "invalid-value"
    assert error.key == f"routes[0].{table}.set.{name}"
    assert f'pgproxy writes the "{name}" field itself' in error.message


def test_every_own_field_is_reported() -> None:
    errors = build_errors(
        'response_headers = { set = { Via = "x", Connection = "y" }, '
        'remove = ["content-length", "server"] }\n'
    )

    assert [error.key for error in errors] == [
        "routes[0].response_headers.set.Via",
        "routes[0].response_headers.set.Connection",
        "routes[0].response_headers.remove[0]",
    ]


def test_host_rule_points_to_host_header() -> None:
    [error] = build_errors('request_headers = { remove = ["host"] }\n')

    assert error.key == "routes[0].request_headers.remove[0]"
    assert error.hint is not None and "host_header" in error.hint


def test_response_host_field_is_allowed() -> None:
    [route] = graph_of('response_headers = { set = { Host = "x" } }\n').routes

    assert route.response_headers is not None


def test_removed_and_set_conflict() -> None:
    [error] = build_errors(
        'response_headers = { set = { Server = "edge" }, remove = ["server"] }\n'
    )

    assert error.code == "conflicting-keys"
    assert error.key == "routes[0].response_headers.set.Server"
    assert "drop it from remove or from set" in error.message


def test_rules_on_a_respond_route_are_rejected() -> None:
    text = HEAD.replace('cluster = "api"', "respond = { status = 204 }")

    with pytest.raises(ConfigError) as caught:
        parse_config(text + 'response_headers = { remove = ["server"] }\n', "t")

    [error] = caught.value.diagnostics
    assert error.code == "conflicting-keys"
    assert error.key == "routes[0].response_headers"
    assert "respond.headers" in error.message


def test_invalid_value_is_rejected() -> None:
    [error] = errors_of('response_headers = { add = { X-A = "a\\r\\nX-B: b" } }\n')

    assert error.key == "routes[0].response_headers.add.X-A"
    assert "control characters" in error.message


def test_rules_on_a_redirect_route_are_rejected() -> None:
    text = HEAD.replace('cluster = "api"', 'redirect = { scheme = "https" }')

    with pytest.raises(ConfigError) as caught:
        parse_config(text + 'request_headers = { remove = ["x-a"] }\n', "t")

    [error] = caught.value.diagnostics
    assert error.key == "routes[0].request_headers"
