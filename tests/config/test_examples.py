"""Every example config validates cleanly and matches the JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import pytest
import tomllib
from typer.testing import CliRunner

from pgproxy.cli.app import app
from pgproxy.cli.schema import build_schema
from pgproxy.graph.load import load_graph

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.toml"))
REQUIRED = {
    "single-site",
    "host-and-path-routing",
    "consistent-hash",
    "canary-by-header",
    "static-responses",
    "demo",
}


def test_required_examples_exist() -> None:
    assert REQUIRED <= {path.stem for path in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_is_valid_without_warnings(path: Path) -> None:
    loaded = load_graph(path)

    assert loaded.diagnostics == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_validates_with_cli(path: Path) -> None:
    result = CliRunner().invoke(
        app, ["validate", "--strict", "--format", "json", str(path)]
    )

    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["diagnostics"] == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_matches_json_schema(path: Path) -> None:
    with path.open("rb") as stream:
        document = tomllib.load(stream)
    validator = jsonschema.Draft7Validator(
        build_schema(), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )

    assert [error.message for error in validator.iter_errors(document)] == []


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_points_editors_at_schema(path: Path) -> None:
    first_line = path.read_text(encoding="utf-8").splitlines()[0]

    assert first_line == "#:schema ../../pgproxy.schema.json"
    assert (path.parent / "../../pgproxy.schema.json").resolve().is_file()


def test_demo_config_shape() -> None:
    graph = load_graph(EXAMPLES[0].parent / "demo.toml").graph

    [listener] = graph.listeners.values()
    assert (listener.host, listener.port) == ("127.0.0.1", 8080)
    [cluster] = graph.clusters.values()
    assert cluster.settings.balancer == "round_robin"
    assert [e.address for e in cluster.endpoints] == [
        "127.0.0.1:9101",
        "127.0.0.1:9102",
        "127.0.0.1:9103",
    ]
    check = cluster.settings.health_check
    assert check is not None
    assert (check.type, check.path) == ("http", "/healthz")
    info = [route for route in graph.routes if route.respond is not None]
    assert [route.path for route in info] == ["/pgproxy-demo-info"]
