"""`pgproxy schema`: print the JSON Schema of the config file.

The schema is generated from the pydantic models, so it always matches what
the loader accepts for the shape of each table; cross-table rules (a route
naming a cluster that exists) are checked only by `pgproxy validate`.
Editors that read Taplo's `#:schema ./pgproxy.schema.json` first line (Even
Better TOML in VS Code, Taplo's language server) use it for completion,
hover text and inline errors. It is JSON Schema draft-07, which those tools
and most validators support, and sub-schemas live under `definitions`.
"""

from __future__ import annotations

import json
import typing
from typing import Any

import typer
from pydantic import BaseModel, TypeAdapter

from pgproxy.config.models import Config

JSON_SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"


def build_schema() -> dict[str, Any]:
    """Return the config's JSON Schema as a dict."""
    schema = Config.model_json_schema(ref_template="#/definitions/{model}")
    definitions = schema.pop("$defs", {})
    _write_defaults(Config, schema)
    for name, definition in definitions.items():
        _write_defaults(_MODELS[name], definition)
    schema.pop("title", None)
    schema.pop("description", None)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "pgproxy config",
        "description": "The TOML config file of pgproxy, a declarative HTTP/1.1 "
        "load balancer and reverse proxy: listeners, routes and clusters.",
        **schema,
        "definitions": definitions,
    }


def _all_models() -> dict[str, type[BaseModel]]:
    found: dict[str, type[BaseModel]] = {}
    pending: list[type[BaseModel]] = [Config]
    while pending:
        model = pending.pop()
        found[model.__name__] = model
        for field in model.model_fields.values():
            for member in _types_in(field.annotation):
                if member.__name__ not in found:
                    pending.append(member)
    return found


def _types_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _types_in(arg)]


def _write_defaults(model: type[BaseModel], schema: dict[str, Any]) -> None:
    """Write each default as the user writes it ("30s", not 30.0)."""
    for name, field in model.model_fields.items():
        prop = schema.get("properties", {}).get(name)
        if prop is None or "default" not in prop or field.annotation is None:
            continue
        value = field.get_default(call_default_factory=True)
        adapter: TypeAdapter[Any] = TypeAdapter(field.rebuild_annotation())
        prop["default"] = adapter.dump_python(value, mode="json")


_MODELS = _all_models()


def render_schema() -> str:
    """Return the schema as the text `pgproxy schema` prints (and the repo keeps)."""
    return json.dumps(build_schema(), indent=2, ensure_ascii=False) + "\n"


def schema_command() -> None:
    """Print the JSON Schema of the config file (draft-07) on stdout."""
    typer.echo(render_schema(), nl=False)
