"""Load a config file into a Graph: read, parse, validate, build, position.

`load_graph` is what `pgproxy run` and a reload call. It either returns a
LoadedGraph, whose diagnostics are warnings only, or raises ConfigError with
every diagnostic of the file, each with its line, column and source line.
The file is read once, so `config_hash` always describes the bytes that the
graph was built from.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from pgproxy.config.diagnostics import Diagnostic
from pgproxy.config.loader import decode_config, parse_config, read_config_bytes
from pgproxy.config.sourcemap import SourceMap
from pgproxy.errors import ConfigError
from pgproxy.graph.build import build_graph
from pgproxy.graph.types import Graph


@dataclass(frozen=True)
class LoadedGraph:
    """A Graph built from one file, its warnings and the hash of its bytes."""

    graph: Graph
    diagnostics: list[Diagnostic]
    # sha256 hex digest of the file's bytes; equal hashes mean equal configs.
    config_hash: str


def load_graph(path: str | Path) -> LoadedGraph:
    """Load the config at `path` and build its Graph.

    Raises ConfigError listing every diagnostic (errors and warnings) when
    the file is unreadable, is not valid TOML, fails model validation or has
    a semantic error.
    """
    file = str(path)
    data = read_config_bytes(path)
    config, source_map = parse_config(decode_config(data, file), file)
    graph, diagnostics = build_graph(config, file)
    positioned = [position(item, source_map) for item in diagnostics]
    if graph is None:
        raise ConfigError(positioned)
    return LoadedGraph(graph, positioned, hashlib.sha256(data).hexdigest())


def position(diagnostic: Diagnostic, source_map: SourceMap) -> Diagnostic:
    """Fill a diagnostic's line, column and source line from its key path."""
    line, column, source_line = source_map.locate(diagnostic.key)
    return dataclasses.replace(
        diagnostic, line=line, column=column, source_line=source_line
    )
