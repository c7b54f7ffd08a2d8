"""Build graphs for tests from TOML text or route tables written as dicts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from pgproxy.config.diagnostics import Diagnostic
from pgproxy.config.loader import parse_config
from pgproxy.graph.build import build_graph
from pgproxy.graph.types import Graph

BASE = """
[listeners.public]
address = "127.0.0.1:8080"

[listeners.internal]
address = "127.0.0.1:8081"

[clusters.c]
endpoints = ["127.0.0.1:9001"]
"""


def toml_value(value: object) -> str:
    """Render a str, int, bool, list or dict as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, Mapping):
        items = ", ".join(
            f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()
        )
        return "{ " + items + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot render {value!r}")


def routes_toml(routes: Sequence[Mapping[str, object]]) -> str:
    """Render route tables as `[[routes]]` entries, each sending to cluster c."""
    blocks = []
    for route in routes:
        fields = {"cluster": "c", **route}
        if "respond" in route:
            del fields["cluster"]
        lines = [f"{key} = {toml_value(value)}" for key, value in fields.items()]
        blocks.append("[[routes]]\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def check(text: str) -> tuple[Graph | None, list[Diagnostic]]:
    """Parse and validate config text, then build its graph."""
    config, _ = parse_config(text, "test.toml")
    return build_graph(config, "test.toml")


def graph_of(routes: Sequence[Mapping[str, object]], base: str = BASE) -> Graph:
    """Build the graph of `base` plus `routes`; fail on any error."""
    graph, diagnostics = check(base + "\n" + routes_toml(routes))
    assert graph is not None, [d.render() for d in diagnostics]
    return graph
