"""`pgproxy explain`: matched route, losing routes, endpoint pick, exit codes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from pgproxy.balancing.consistent_hash import ConsistentHashBalancer
from pgproxy.cli.app import app
from pgproxy.cli.explain import parse_request
from pgproxy.graph.load import load_graph

CONFIG = """\
[listeners.public]
address = "0.0.0.0:8080"

[listeners.admin]
address = "127.0.0.1:9000"

[[routes]]
name = "me"
host = "api.example.com"
path = "/v1/users/me"
cluster = "api"

[[routes]]
name = "v1"
host = "api.example.com"
path_prefix = "/v1"
cluster = "api"

[[routes]]
name = "canary"
host = "api.example.com"
path_prefix = "/v1"
headers = { x-canary = "1" }
cluster = "web"

[[routes]]
name = "status"
listeners = ["admin"]
path = "/status"
respond = { status = 200, body = "ok" }

[[routes]]
name = "site"
host = "*.example.com"
cluster = "web"

[clusters.api]
endpoints = [
    "10.0.0.1:8000",
    "10.0.0.2:8000",
    { address = "10.0.0.3:8000", weight = 2 },
]
balancer = "consistent_hash"
hash_key = "header:x-user"

[clusters.api.health_check]
path = "/healthz"

[clusters.web]
endpoints = [{ address = "10.0.1.1:80", weight = 2 }, "10.0.1.2:80"]

[clusters.web.health_check]
path = "/"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "pgproxy.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def strict_config(tmp_path: Path) -> Path:
    """CONFIG with listener public rejecting `;` and `%2F` in paths."""
    path = tmp_path / "strict.toml"
    path.write_text(
        CONFIG.replace(
            'address = "0.0.0.0:8080"\n',
            'address = "0.0.0.0:8080"\n'
            'reject_ambiguous_paths = ["semicolon", "escaped_slash"]\n',
        )
    )
    return path


def _explain(*args: str) -> Result:
    return CliRunner().invoke(app, ["explain", *args])


def test_match_with_consistent_hash(config: Path) -> None:
    result = _explain(
        str(config), "GET http://api.example.com:8080/v1/users/7", "-H", "X-User: 42"
    )
    assert result.exit_code == 0, result.output
    assert "=> v1 (routes[1]): matches" in result.output
    assert "me (routes[0]): path /v1/users/7 is not /v1/users/me" in result.output
    assert "canary (routes[2]): header x-canary is missing" in result.output
    assert (
        "site (routes[4]): matches but loses to v1: exact host beats wildcard"
        in result.output
    )
    graph = load_graph(config).graph
    expected = ConsistentHashBalancer(graph.clusters["api"].endpoints).pick("42")
    assert (
        f'endpoint: {expected.address}  (consistent_hash on header:x-user = "42")'
        in (result.output)
    )


def test_pick_is_deterministic(config: Path) -> None:
    args = (str(config), "GET http://api.example.com/v1", "-H", "x-user: abc")
    first = _explain(*args)
    second = _explain(*args)
    assert first.output == second.output


def test_header_condition_wins(config: Path) -> None:
    result = _explain(
        str(config), "GET http://api.example.com/v1/x", "-H", "X-Canary: 1"
    )
    assert result.exit_code == 0, result.output
    assert "=> canary (routes[2]): matches" in result.output
    assert (
        "v1 (routes[1]): matches but loses to canary: more method/header"
        in result.output
    )
    # Round robin 2:1 starts with the heavier endpoint.
    assert "endpoint: 10.0.1.1:80  (round_robin, first pick" in result.output
    assert "if it is unhealthy or fails: 10.0.1.2:80" in result.output


def test_missing_hash_key_falls_back(config: Path) -> None:
    result = _explain(str(config), "GET http://api.example.com/v1")
    assert result.exit_code == 0, result.output
    assert "header:x-user is missing, so round robin picks" in result.output
    assert "endpoint: 10.0.0.3:8000" in result.output


def test_respond_route_on_listener(config: Path) -> None:
    result = _explain(str(config), "GET /status", "--listener", "admin")
    assert result.exit_code == 0, result.output
    assert "=> status (routes[3]): matches" in result.output
    assert "response: 200 sent by pgproxy itself" in result.output


def test_listener_chosen_by_port(config: Path) -> None:
    result = _explain(str(config), "GET http://localhost:9000/status")
    assert result.exit_code == 0, result.output
    assert "listener admin" in result.output
    assert "note:" not in result.output


@pytest.mark.parametrize("method", ["PROPFIND", "PURGE", "QUERY", "get"])
def test_parser_methods_are_explained(config: Path, method: str) -> None:
    result = _explain(str(config), f"{method} http://localhost:9000/status")
    assert result.exit_code == 0, result.output
    assert "pgproxy responds with" not in result.output


def test_no_match_exits_1(config: Path) -> None:
    result = _explain(str(config), "GET http://example.org:8080/")
    assert result.exit_code == 1
    assert "no route matches: pgproxy answers 404" in result.output
    assert "other routes do not match" in result.output


def test_all_lists_every_route(config: Path) -> None:
    result = _explain(str(config), "GET http://example.org:8080/", "--all")
    assert result.exit_code == 1
    assert (
        "site (routes[4]): host example.org does not match *.example.com"
        in result.output
    )
    assert (
        "status (routes[3]): listener public is not one of the route's (admin)"
        in result.output
    )


def test_path_is_routed_after_normalisation(config: Path) -> None:
    result = _explain(str(config), "GET http://localhost:9000/x/..//%73tatus")
    assert result.exit_code == 0, result.output
    assert "routed as: /status" in result.output
    assert "response: 200 sent by pgproxy itself" in result.output


@pytest.mark.parametrize(
    ("url", "text", "name"),
    [
        ("http://api.example.com:8080/v1;x/users", ";", "semicolon"),
        ("http://api.example.com:8080/v1%2fusers?a=1", "%2f", "escaped_slash"),
    ],
)
def test_rejected_path_exits_1(
    strict_config: Path, url: str, text: str, name: str
) -> None:
    result = _explain(str(strict_config), f"GET {url}")
    assert result.exit_code == 1, result.output
    assert (
        f'rejected: the path contains "{text}" and listener public has "{name}" '
        "in reject_ambiguous_paths, so pgproxy answers 400 before routing"
    ) in " ".join(result.output.split())
    assert "routes, most specific first" not in result.output
    assert "endpoint:" not in result.output


def test_query_and_other_listener_pass(strict_config: Path) -> None:
    in_query = _explain(
        str(strict_config), "GET http://api.example.com:8080/v1?a;b=%2F"
    )
    assert in_query.exit_code == 0, in_query.output
    assert "=> v1 (routes[1]): matches" in in_query.output
    other = _explain(str(strict_config), "GET http://www.example.com:9000/a;b%2Fc")
    assert other.exit_code == 0, other.output
    assert "listener admin" in other.output
    assert "rejected" not in other.output
    assert "=> site (routes[4]): matches" in other.output


@pytest.mark.parametrize(
    "args",
    [
        ["GET /%zz"],
        ["GET /admin#x"],
        ["GET"],
        ["GET ftp://x/"],
        ["GET x/y"],
        ["GET /", "-H", "no colon"],
        ["GET /", "--listener", "nope"],
    ],
)
def test_usage_errors_exit_2(config: Path, args: list[str]) -> None:
    result = _explain(str(config), *args)
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["GET http://api.example.com/v1/\x1b[31mred"], 400),
        (["GET /v1/a b"], 400),
        (["GET /v1/\u00fc"], 400),
        (["GET http://user@api.example.com/v1"], 400),
        (["G\x01T /v1"], 400),
        (["GET /v1", "-H", "X-Canary: 1\x1b[0m"], 400),
        (["CONNECT http://api.example.com/"], 501),
        (["BREW /v1"], 501),
        (["brew /v1"], 501),
        (["DESCRIBE /v1"], 400),
        (["PRI /v1"], 400),
        (["GET /v1", "-H", "Host: api.example.com\\"], 400),
        (["GET /v1", "-H", "Host: x:api.example.com"], 400),
        (["GET /v1", "-H", "Host: api example"], 400),
        (["GET /v1", "-H", "Host: [api.example.com]"], 400),
    ],
    ids=[
        "escape",
        "space",
        "non-ascii",
        "userinfo",
        "method",
        "header",
        "connect",
        "unknown-method",
        "unknown-lower-case-method",
        "rtsp-method",
        "http2-preface-method",
        "host-backslash",
        "host-two-colons",
        "host-space",
        "host-bracketed-name",
    ],
)
def test_requests_pgproxy_rejects(config: Path, args: list[str], status: int) -> None:
    result = _explain(str(config), *args)

    assert result.exit_code == 2, result.output
    assert f"pgproxy responds with {status}" in result.output
    assert "=>" not in result.output
    assert "\x1b" not in result.output  # controls are shown escaped, never raw


@pytest.mark.parametrize(
    "url",
    [
        "http://api.example.com:99999/",
        "http://api.example.com:x/",
        "http://[::1/",
        "http://[api.example.com]/",
    ],
)
def test_invalid_url_authority_named(config: Path, url: str) -> None:
    result = _explain(str(config), f"GET {url}")

    assert result.exit_code == 2, result.output
    assert f'invalid URL "{url}"' in result.output


def test_invalid_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        CONFIG.replace(
            'cluster = "web"\n\n[[routes]]\nname = "status"',
            'cluster = "wbe"\n\n[[routes]]\nname = "status"',
        )
    )
    result = _explain(str(path), "GET /")
    assert result.exit_code == 2
    assert "unknown-cluster" in result.output


@pytest.mark.timeout(10)
def test_fifo_config_exits_2(tmp_path: Path) -> None:
    fifo = tmp_path / "pgproxy.toml"
    os.mkfifo(fifo)

    result = _explain(str(fifo), "GET /")

    assert result.exit_code == 2
    assert "not a regular file" in result.output


def test_missing_config_exits_2(tmp_path: Path) -> None:
    result = _explain(str(tmp_path / "absent.toml"), "GET /")
    assert result.exit_code == 2
    assert "file not found" in result.output


def test_parse_request_forms() -> None:
    absolute = parse_request(
        "get https://API.example.com/a%20b?x=1", ["Host: other"], "1.2.3.4"
    )
    assert absolute.method == "GET"
    assert absolute.host == "API.example.com"
    assert absolute.port == 443
    assert (absolute.path, absolute.query) == ("/a%20b", "x=1")
    origin = parse_request("POST /upload", ["Host: files.example.com"], "1.2.3.4")
    assert origin.host == "files.example.com"
    assert origin.port is None
    assert origin.headers == {"host": "files.example.com"}


def test_redirect_route_shows_location(tmp_path: Path) -> None:
    path = tmp_path / "redirect.toml"
    path.write_text(
        '[listeners.web]\naddress = "127.0.0.1:8080"\n\n'
        '[[routes]]\nredirect = { path = "/new", status = 308 }\n'
    )

    result = _explain(str(path), "GET http://site.test:8080/old?q=1")

    assert result.exit_code == 0, result.output
    assert "redirect: 308 to http://site.test:8080/new?q=1" in result.output
