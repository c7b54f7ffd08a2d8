"""Translation of pydantic validation errors into positioned Diagnostics.

Every pydantic error becomes at most one Diagnostic whose key path is the
TOML path the user wrote (`clusters.api.endpoints[1].weight`), never
pydantic's internal location with union branch tags in it. A value may take
several shapes (an endpoint is a string or a table), and then only the errors
of the shape the user wrote are kept. When the value fits no shape at all,
the branch errors merge into one "expected X or Y" diagnostic.

Codes produced here: `unknown-key`, `missing-key`, `invalid-type`,
`invalid-value` and `conflicting-keys` (from the models' own checks).
"""

from __future__ import annotations

import datetime
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from pgproxy.config.diagnostics import Diagnostic
from pgproxy.config.models import Config
from pgproxy.config.sourcemap import (
    KeyPart,
    KeyPath,
    SourceMap,
    format_key_path,
    parse_key_path,
)
from pgproxy.config.units import SHAPE_ERROR

# Errors that mean "the value has another shape than this branch expects",
# with the phrase naming the expected shape.
_SHAPES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "literal_error": "",
}
# Error types that the models raise with PydanticCustomError; each type is
# the diagnostic code itself.
_CUSTOM_CODES = frozenset({"conflicting-keys", "missing-key", "invalid-value"})
_BOUNDS = {
    "greater_than_equal": ("ge", "at least"),
    "greater_than": ("gt", "greater than"),
    "less_than_equal": ("le", "at most"),
    "less_than": ("lt", "less than"),
}


@dataclass(frozen=True, slots=True)
class _Location:
    """Position of one pydantic error in the config, in the user's terms."""

    path: KeyPath
    model: type[BaseModel] | None
    field: FieldInfo | None
    union_path: KeyPath | None
    dict_key: bool


def diagnostics_from_error(
    error: ValidationError, source: SourceMap, file: str
) -> list[Diagnostic]:
    """Translate every error in `error` into Diagnostics positioned in `source`."""
    located = [(details, _walk(details["loc"])) for details in error.errors()]
    kept = _drop_branch_noise(located)
    kept = _drop_typo_twins(kept)
    diagnostics = [_translate(details, where, source, file) for details, where in kept]
    return sorted(set(diagnostics), key=lambda d: (d.line, d.column, d.key, d.code))


def _drop_typo_twins(
    located: list[tuple[ErrorDetails, _Location]],
) -> list[tuple[ErrorDetails, _Location]]:
    """Drop "missing key X" when the same table has an unknown key close to X.

    A misspelt required key produces both errors; the unknown-key one, with
    its "did you mean", is the one that names the fix.
    """
    unknown: dict[KeyPath, list[str]] = {}
    for details, where in located:
        if details["type"] == "extra_forbidden" and where.path:
            unknown.setdefault(where.path[:-1], []).append(str(where.path[-1]))
    kept = []
    for details, where in located:
        if details["type"] == "missing" and where.path:
            typos = unknown.get(where.path[:-1], [])
            if difflib.get_close_matches(str(where.path[-1]), typos, n=1, cutoff=0.6):
                continue
        kept.append((details, where))
    return kept


def _drop_branch_noise(
    located: list[tuple[ErrorDetails, _Location]],
) -> list[tuple[ErrorDetails, _Location]]:
    """Keep the errors of the union branch whose shape matches the input."""
    kept: list[tuple[ErrorDetails, _Location]] = []
    unions: dict[KeyPath, list[tuple[ErrorDetails, _Location]]] = {}
    for item in located:
        union_path = item[1].union_path
        if union_path is None:
            kept.append(item)
        else:
            unions.setdefault(union_path, []).append(item)
    for union_path, items in unions.items():
        real = [item for item in items if not _is_shape_error(item, union_path)]
        kept.extend(real if real else [_merge_shapes(items)])
    return kept


def _is_shape_error(item: tuple[ErrorDetails, _Location], union_path: KeyPath) -> bool:
    details, where = item
    return details["type"] in _SHAPES and where.path == union_path


def _merge_shapes(
    items: list[tuple[ErrorDetails, _Location]],
) -> tuple[ErrorDetails, _Location]:
    """Fold "not a string", "not a table" into one "expected ... or ..." error."""
    shapes: list[str] = []
    for details, _ in items:
        shape = _expected_shape(details)
        if shape not in shapes:
            shapes.append(shape)
    details, where = items[0]
    merged: ErrorDetails = {
        "type": SHAPE_ERROR,
        "loc": details["loc"],
        "msg": f"expected {_join_or(shapes)}",
        "input": details["input"],
    }
    return merged, where


def _expected_shape(details: ErrorDetails) -> str:
    if details["type"] == "literal_error":
        expected = str((details.get("ctx") or {}).get("expected", ""))
        return expected.replace("'", '"')
    return _SHAPES[details["type"]]


def _join_or(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


def _translate(
    details: ErrorDetails, where: _Location, source: SourceMap, file: str
) -> Diagnostic:
    kind = details["type"]
    ctx = details.get("ctx") or {}
    path = where.path
    if kind in _CUSTOM_CODES and isinstance(ctx.get("key"), str):
        # A display path such as `set."X-Id"` names a key inside the model.
        path = (*path, *parse_key_path(ctx["key"]))
    key = format_key_path(path)
    code, message, hint = _describe(details, where)
    if code in ("invalid-type", "invalid-value") and not where.dict_key:
        line, column, text = source.locate_value(key)
    else:
        line, column, text = source.locate(key)
    return Diagnostic(
        file=file,
        line=line,
        column=column,
        key=key,
        code=code,
        message=message,
        hint=hint,
        source_line=text,
    )


def _describe(details: ErrorDetails, where: _Location) -> tuple[str, str, str | None]:
    """Return (code, message, hint) for one error."""
    kind = details["type"]
    ctx = details.get("ctx") or {}
    value = details["input"]
    last = where.path[-1] if where.path else ""
    name = last if isinstance(last, str) and last else "value"
    if kind in _CUSTOM_CODES:
        return kind, details["msg"], None
    if kind == "extra_forbidden":
        return "unknown-key", f'unknown key "{last}"', _suggest_key(str(last), where)
    if kind == "missing":
        noun = "table" if _is_table(where.field) else "key"
        return "missing-key", f'missing required {noun} "{last}"', _about(last, where)
    if kind == "value_error":
        return "invalid-value", str(ctx.get("error", details["msg"])), None
    if kind == "literal_error":
        choices = _expected_shape(details)
        message = f"invalid {name} {_show(value)}: expected one of {choices}"
        return "invalid-value", message, _suggest_choice(value, details)
    if kind in _BOUNDS:
        bound, phrase = _BOUNDS[kind]
        message = f"invalid {name} {_show(value)}: must be {phrase} {ctx[bound]}"
        return "invalid-value", message, None
    if kind == SHAPE_ERROR or kind in _SHAPES:
        expected = details["msg"] if kind == SHAPE_ERROR else _SHAPES[kind]
        expected = expected.removeprefix("expected ")
        message = f"invalid type: expected {expected}, got {describe_value(value)}"
        return "invalid-type", message, _table_hint(where) or _about(last, where)
    return "invalid-value", details["msg"], _about(last, where)


def _about(key: KeyPart, where: _Location) -> str | None:
    """Return `key: description` from the model field, as a hint."""
    if where.field is None or not where.field.description:
        return None
    names = [part for part in where.path if isinstance(part, str)]
    name = key if isinstance(key, str) else "value"
    if isinstance(key, int) and names:
        name = names[-1]
    return f"{name}: {where.field.description}"


def _is_table(field: FieldInfo | None) -> bool:
    if field is None:
        return False
    annotation = _unwrap(field.annotation)
    return typing.get_origin(annotation) is dict or _is_model(annotation)


def _suggest_key(unknown: str, where: _Location) -> str | None:
    if where.model is None:
        return None
    names = list(where.model.model_fields)
    close = difflib.get_close_matches(unknown, names, n=1, cutoff=0.6)
    if close:
        return f'did you mean "{close[0]}"?'
    return "valid keys here: " + ", ".join(names)


def _suggest_choice(value: object, details: ErrorDetails) -> str | None:
    expected = (details.get("ctx") or {}).get("expected", "")
    choices = [
        part.strip(" '") for part in str(expected).replace(" or ", ", ").split(",")
    ]
    if not isinstance(value, str):
        return None
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else None


def _table_hint(where: _Location) -> str | None:
    """Explain named tables when a value sits where a named table belongs."""
    if where.field is None or len(where.path) < 2:
        return None
    annotation = _unwrap(where.field.annotation)
    if typing.get_origin(annotation) is not dict:
        return None
    parent = format_key_path(where.path[:-1])
    return f"entries of {parent} are named tables, such as [{parent}.NAME]"


def _show(value: object) -> str:
    """Write a scalar as it appears in TOML: strings quoted, booleans lower-case."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def describe_value(value: object) -> str:
    """Name a TOML value with its type, as in `string "x"` or `integer 5`."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f'string "{shown}"'
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return f"date-time {value.isoformat()}"
    return repr(value)


def _walk(loc: tuple[int | str, ...]) -> _Location:
    """Follow pydantic's `loc` through the Config model, dropping branch tags."""
    annotation: Any = Config
    path: list[KeyPart] = []
    model: type[BaseModel] | None = None
    field: FieldInfo | None = None
    union_path: KeyPath | None = None
    for part in loc:
        annotation = _unwrap(annotation)
        if part == "[key]":
            return _Location(tuple(path), model, field, union_path, dict_key=True)
        if _is_union(annotation):
            # pydantic names the branch after a union of several types.
            union_path = tuple(path)
            annotation = _pick_branch(annotation, str(part))
            continue
        if _is_model(annotation):
            model, field = annotation, annotation.model_fields.get(str(part))
            annotation = field.annotation if field is not None else None
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        elif isinstance(part, str) and ("[" in part or "(" in part):
            continue
        path.append(part)
    return _Location(tuple(path), model, field, union_path, dict_key=False)


def _unwrap(annotation: Any) -> Any:
    """Strip `Annotated[...]` and `X | None` down to the type that is validated."""
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif _is_union(annotation):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _pick_branch(annotation: Any, tag: str) -> Any:
    """Return the union member that pydantic's branch tag names."""
    members = [_unwrap(a) for a in typing.get_args(annotation)]
    for member in members:
        if _is_model(member) and member.__name__ == tag:
            return member
    return None
