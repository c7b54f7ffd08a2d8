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

from pgproxy.config.diagnostics import Diagnostic, Severity
from pgproxy.config.loader import MAX_CONFIG_BYTES, load_config, parse_config
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
    data = _read(Path(path))
    if data is None:
        # The loader owns the messages for unreadable, oversized, binary and
        # non-UTF-8 files; let it read the file and raise them.
        load_config(path)
        raise ConfigError([_changed_while_reading(file)])
    text = data.decode("utf-8-sig")
    config, source_map = parse_config(text, file)
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


def _read(path: Path) -> bytes | None:
    """Return the file's bytes, or None when the loader must report a problem."""
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_CONFIG_BYTES or not data.strip() or b"\0" in data:
        return None
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    return data


def _changed_while_reading(file: str) -> Diagnostic:
    return Diagnostic(
        file,
        0,
        0,
        "",
        "file-unreadable",
        "the file could not be read consistently; it may have changed while being read",
        Severity.ERROR,
        "try again once the file is written completely",
    )
