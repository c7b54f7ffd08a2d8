"""`pgproxy schema`: the JSON Schema, its checked-in copy, and what it rejects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
from typer.testing import CliRunner

from pgproxy.cli.app import app
from pgproxy.cli.schema import JSON_SCHEMA_DIALECT, build_schema, render_schema

CHECKED_IN = Path(__file__).parents[2] / "pgproxy.schema.json"


def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(
        build_schema(), format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )


def test_command_prints_schema() -> None:
    result = CliRunner().invoke(app, ["schema"])

    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"] == JSON_SCHEMA_DIALECT
    assert schema["title"] == "pgproxy config"
    assert "description" in schema
    assert schema["additionalProperties"] is False


def test_checked_in_copy_is_current() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == render_schema(), (
        "pgproxy.schema.json is out of date; regenerate it: "
        "pgproxy schema > pgproxy.schema.json"
    )


def test_schema_is_valid_draft7() -> None:
    jsonschema.Draft7Validator.check_schema(build_schema())


def test_references_resolve() -> None:
    text = render_schema()
    definitions = build_schema()["definitions"]

    assert "$defs" not in text
    for name in ("ServerConfig", "ListenerConfig", "RouteConfig", "ClusterConfig"):
        assert f'"#/definitions/{name}"' in text
        assert name in definitions


def test_defaults_are_written_as_users_write_them() -> None:
    server = build_schema()["definitions"]["ServerConfig"]["properties"]

    assert server["drain_timeout"]["default"] == "30s"
    assert server["workers"]["default"] == 1


MINIMAL: dict[str, Any] = {"listeners": {"public": {"address": "0.0.0.0:80"}}}


@pytest.mark.parametrize(
    "document",
    [
        MINIMAL,
        {**MINIMAL, "server": {"drain_timeout": "250ms", "workers": "auto"}},
        # The loader accepts spaces around the number and the unit, and so
        # does the schema, so an editor does not mark a valid value.
        {**MINIMAL, "server": {"drain_timeout": " 5 s "}},
        {
            **MINIMAL,
            "listeners": {
                "public": {"address": "0.0.0.0:80", "max_body_bytes": "1 KiB"}
            },
        },
        {**MINIMAL, "clusters": {"a": {"endpoints": ["a:1", {"address": "b:2"}]}}},
    ],
)
def test_schema_accepts(document: dict[str, Any]) -> None:
    assert list(validator().iter_errors(document)) == []


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "'listeners' is a required property"),
        ({"listeners": {"a b": {"address": "x"}}}, "does not match any of the regexes"),
        ({"listeners": {"a": {"adress": "x"}}}, "'adress' was unexpected"),
        ({**MINIMAL, "server": {"drain_timeout": 5}}, "5 is not of type 'string'"),
        ({**MINIMAL, "server": {"drain_timeout": "5 sec"}}, "does not match"),
        ({**MINIMAL, "server": {"access_log": "text"}}, "is not one of"),
        ({**MINIMAL, "routes": {"cluster": "a"}}, "is not of type 'array'"),
    ],
)
def test_schema_rejects(document: dict[str, Any], message: str) -> None:
    messages = [error.message for error in validator().iter_errors(document)]

    assert any(message in text for text in messages), messages
