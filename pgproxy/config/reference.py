"""Generate docs/configuration.md, the config reference, from the models.

Every table and key comes from the pydantic models and the JSON Schema that
`pgproxy schema` prints, so the reference cannot drift from what the loader
accepts; a test compares the checked-in file with this output. Regenerate
it with:

    python -m pgproxy.config.reference > docs/configuration.md
"""

from __future__ import annotations

import json
import sys
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from pgproxy.config.models import Config
from pgproxy.config.units import DURATION_PATTERN, SIZE_PATTERN, format_size

REGENERATE_COMMAND = "python -m pgproxy.config.reference > docs/configuration.md"

_INTRO = f"""\
# Configuration reference

<!-- Generated from pgproxy/config/models.py; do not edit by hand.
     Regenerate: {REGENERATE_COMMAND} -->

pgproxy reads one TOML file. Every table rejects keys it does not list here,
so a misspelt key is an error, not a silently ignored setting. Check a file
with `pgproxy validate CONFIG`; `pgproxy schema` prints the same structure as
JSON Schema for editors.

Value types used below:

- **duration**: a string with a unit: `"250ms"`, `"5s"`, `"2m"`, `"1h"`.
  A bare number is rejected, because its unit would be a guess. A duration
  is 1ms to 24h; where 0 is also accepted, the description says what it does.
- **size**: bytes as an integer, or a string with a unit: `"64KiB"`,
  `"10MiB"`, `"1GiB"` (powers of 1024) or `"64KB"`, `"10MB"` (powers of 1000).
- **NAME** in a table name is a name you choose: letters, digits, `_`, `.`
  and `-`, starting with a letter or digit. Routes refer to listeners and
  clusters by these names.

Routes match the request path after normalisation, as nginx matches
locations: every `%XX` escape is decoded once, dot segments are removed and
repeated slashes merged, so `/%61dmin`, `/x/../admin` and `//admin` all match
`path = "/admin"`. A bad escape or an escaped NUL gets 400. The upstream
receives the path exactly as the client sent it; with `strip_prefix`, it
receives the normalised path without the prefix, percent-encoded again. A
target with `#` gets 400.

An upstream that reads a path differently from this normalisation can still
be reached by spellings that the route match does not see. A listener's
`reject_ambiguous_paths` rejects each spelling it names with 400 before
routing, so no upstream receives it:

```toml
[listeners.public]
address = "0.0.0.0:8080"
reject_ambiguous_paths = ["semicolon", "backslash", "escaped_slash"]
```

- `"semicolon"` rejects `;` and `%3B`. Tomcat and Spring read `/admin;x`
  as `/admin`, because `;` starts path parameters there.
- `"backslash"` rejects `\\` and `%5C`, which some servers take as `/`.
- `"escaped_slash"` rejects `%2F`. Routes read `/admin/x%2F..%2F..%2Fpublic`
  as `/public`, but an upstream that splits the path before it decodes
  treats it as one segment under `/admin/`.
- `"escaped_percent"` rejects `%25`, for upstreams that decode twice and so
  read `%252F` as `/`.
- `"overlong_utf8"` rejects escaped overlong UTF-8 sequences, which spend
  more bytes on a character than UTF-8 allows (RFC 3629 section 3), such as
  `%C0%AF` and `%E0%80%AF` for `/` and `%C0%AE` for `.`. A sequence is
  overlong when it starts with `%C0` or `%C1` followed by `%80`-`%BF`, `%E0`
  by `%80`-`%9F`, `%F0` by `%80`-`%8F`, `%F8` by `%80`-`%87` or `%FC` by
  `%80`-`%83`. Routes read these bytes as invalid UTF-8, not as `/` or `.`,
  but an upstream with a lenient decoder reads `/x/%C0%AE%C0%AE/admin` as
  `/admin`.

Escapes match in either case, so `%2f` is rejected too. The query string is
not checked: `;`, `%2F` and `%25` after `?` are forwarded. `%252F` is not an
escaped slash: routes and an upstream that decodes once (RFC 3986 section
2.4) both read it as the text `%2F`. An upstream that decodes twice reads
any `%25` escape differently (`%2561` as `a`), so `"escaped_percent"`
rejects them all. Leave out a name whose spelling your upstreams need:
GitLab's API takes project paths as `group%2Fproject`, and servlet
containers may put `;jsessionid=` in URLs. The default, `[]`, forwards every
spelling as sent; then deny such paths at the upstream too, or match them
with a `path_regex` route. A rejected request is logged at DEBUG level, and
its access log record has the failure flag `ambiguous_path`. A reload that
changes the list applies to the next request, on connections already open
too.
"""


def render_reference() -> str:
    """Return the whole Markdown reference."""
    parts = [_INTRO]
    for header, model in _tables(Config, ""):
        parts.append(_render_table(header, model))
    return "\n".join(parts)


def _tables(
    model: type[BaseModel], prefix: str
) -> Iterator[tuple[str, type[BaseModel]]]:
    """Yield (TOML table header, model) for every table, depth first."""
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        annotation = _unwrap(field.annotation)
        origin = typing.get_origin(annotation)
        if _is_model(annotation):
            yield f"[{path}]", annotation
            yield from _tables(annotation, path)
        elif origin is dict and _model_in(annotation):
            child = _model_in(annotation)
            assert child is not None
            yield f"[{path}.NAME]", child
            yield from _tables(child, f"{path}.NAME")
        elif origin is list and _model_in(annotation):
            child = _model_in(annotation)
            assert child is not None
            yield f"[[{path}]]", child
            yield from _tables(child, path)


def _render_table(header: str, model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip()
    properties = model.model_json_schema(ref_template="{model}").get("properties", {})
    lines = [f"## `{header}`", "", doc, ""]
    lines.append("| Key | Type | Default | Description |")
    lines.append("| --- | --- | --- | --- |")
    for name, field in model.model_fields.items():
        prop = properties.get(name, {})
        kind = _type_text(prop)
        default = _default_text(field, prop)
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | {kind} | {default} | {description} |")
    return "\n".join(lines) + "\n"


def _type_text(prop: dict[str, Any]) -> str:
    """Describe a JSON Schema property in TOML terms."""
    if "anyOf" in prop:
        if _is_size(prop):
            return _size_range_text(prop)
        branches = [b for b in prop["anyOf"] if b.get("type") != "null"]
        texts = [_type_text(branch) for branch in branches]
        return " or ".join(dict.fromkeys(texts))
    if "$ref" in prop:
        return "table"
    if "enum" in prop:
        return " \\| ".join(f"`{json.dumps(value)}`" for value in prop["enum"])
    kind = str(prop.get("type", "value"))
    if kind == "string" and prop.get("pattern") == DURATION_PATTERN:
        return "duration"
    if kind == "string" and prop.get("format") in ("ipv4network", "ipv6network"):
        return "CIDR"
    if kind == "array":
        return f"array of {_plural_type(prop.get('items', {}))}"
    if kind == "object":
        values = prop.get("additionalProperties")
        if isinstance(values, dict):
            return f"table of {_plural_type(values)}"
        return "table"
    return _range_text(kind, prop)


def _plural_type(prop: dict[str, Any]) -> str:
    text = _type_text(prop)
    plurals = {"string": "strings", "CIDR": "CIDRs", "table": "tables"}
    return " or ".join(plurals.get(part, part) for part in text.split(" or "))


def _range_text(kind: str, prop: dict[str, Any]) -> str:
    low, high = prop.get("minimum"), prop.get("maximum")
    if low is not None and high is not None:
        return f"{kind}, {low}-{high}"
    if low is not None:
        return f"{kind}, at least {low}"
    return kind


def _size_range_text(prop: dict[str, Any]) -> str:
    integer = next(b for b in prop["anyOf"] if b.get("type") == "integer")
    low, high = integer.get("minimum"), integer.get("maximum")
    if low is not None and high is not None:
        return f"size, {format_size(low)}-{format_size(high)}"
    return "size"


def _is_size(prop: dict[str, Any]) -> bool:
    return any(
        branch.get("pattern") == SIZE_PATTERN for branch in prop.get("anyOf", [])
    )


def _default_text(field: FieldInfo, prop: dict[str, Any]) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, BaseModel):
        return "see its table"
    adapter: TypeAdapter[Any] = TypeAdapter(field.rebuild_annotation())
    dumped = adapter.dump_python(value, mode="json")
    if _is_size(prop) and isinstance(dumped, int):
        return f"`{json.dumps(format_size(dumped))}`"
    return f"`{json.dumps(dumped)}`"


def _unwrap(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, type(int | str)):
        return _unwrap(members[0]) if len(members) == 1 else annotation
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """Return the model among a container's value types, if any."""
    for arg in typing.get_args(annotation):
        arg = _unwrap(arg)
        if _is_model(arg):
            return typing.cast(type[BaseModel], arg)
        for member in typing.get_args(arg):
            if _is_model(_unwrap(member)):
                return typing.cast(type[BaseModel], _unwrap(member))
    return None


if __name__ == "__main__":
    sys.stdout.write(render_reference())
