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
from pathlib import Path

from pgproxy.config.diagnostics import Diagnostic
from pgproxy.config.loader import decode_config, parse_config, read_config_bytes
from pgproxy.config.sourcemap import SourceMap
from pgproxy.errors import ConfigError
from pgproxy.graph.build import FileCheck, build_graph
from pgproxy.graph.types import LoadedGraph as LoadedGraph


def load_graph(path: str | Path, file_check: FileCheck | None = None) -> LoadedGraph:
    """Load the config at `path` and build its Graph.

    Relative file paths in the config are resolved against the directory of
    `path`. `file_check` is passed to build_graph. Raises ConfigError listing
    every diagnostic (errors and warnings) when the file is unreadable, is
    not valid TOML, fails model validation or has a semantic error.
    """
    file = str(path)
    data = read_config_bytes(path)
    config, source_map = parse_config(decode_config(data, file), file)
    graph, diagnostics = build_graph(config, file, file_check)
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


def load_graph_bytes(data: bytes, path: str) -> LoadedGraph:
    """Build a graph from a config file's bytes, as `load_graph` does from the file.

    Raises ConfigError with every diagnostic.
    """
    config, source_map = parse_config(data.decode("utf-8-sig"), path)
    graph, diagnostics = build_graph(config, path)
    positioned = [position(item, source_map) for item in diagnostics]
    if graph is None:
        raise ConfigError(positioned)
    return LoadedGraph(graph, positioned, hashlib.sha256(data).hexdigest())


def read_config(path: str, attempts: int = 3) -> tuple[LoadedGraph, bytes]:
    """Load the config file and return it with the exact bytes it was built from.

    Raises ConfigError, also when the file keeps changing while being read.
    """
    for _ in range(attempts):
        loaded = load_graph(path)
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == loaded.config_hash:
            return loaded, data
    raise ConfigError(
        [
            Diagnostic(
                path,
                0,
                0,
                "",
                "file-unreadable",
                "the file changed while it was being read",
                hint="try again once the file is written completely",
            )
        ]
    )
