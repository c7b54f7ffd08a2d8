"""The pure core (route matching, balancers, health state, reports) does no I/O.

Two checks: an AST walk over every pgproxy module the core imports, which
rejects any direct import of an I/O library, and a fresh interpreter that
imports the core and must not end up with an event loop or HTTP library in
sys.modules. `socket` is checked only by the walk, because pydantic imports
it through the standard library's email package.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pgproxy.compiled import source_path

FORBIDDEN = {"anyio", "asyncio", "socket", "httpcore", "httptools"}
CORE = [
    "pgproxy.graph.paths",
    "pgproxy.graph.routing",
    "pgproxy.balancing",
    "pgproxy.balancing.round_robin",
    "pgproxy.balancing.consistent_hash",
    "pgproxy.balancing.least_request",
    "pgproxy.balancing.random",
    "pgproxy.health.state",
    "pgproxy.health.reports",
    "pgproxy.health.shared",
]


def _present(modules: list[str]) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is not None]


def _imports(module: str) -> set[str]:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    origin = spec.origin
    if not origin.endswith(".py"):
        # Compiled by mypyc: walk the source it was compiled from.
        origin = source_path(module)
    tree = ast.parse(Path(origin).read_text(), origin)
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            # `from pgproxy.balancing import random` imports a submodule.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        # `pgproxy.graph.types.Cluster` names a class, not a submodule.
        return False


def _walk(root: str) -> dict[str, set[str]]:
    """Map every pgproxy module reachable from `root` to its imports."""
    seen: dict[str, set[str]] = {}
    pending = [root]
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen[module] = _imports(module)
        for name in seen[module]:
            if name.startswith("pgproxy") and _is_module(name):
                pending.append(name)
    return seen


@pytest.mark.parametrize("root", _present(CORE))
def test_core_imports_no_io_library(root: str) -> None:
    offenders = {
        module: sorted(name for name in names if name.split(".")[0] in FORBIDDEN)
        for module, names in _walk(root).items()
    }
    assert {m: names for m, names in offenders.items() if names} == {}


def test_core_loads_no_event_loop() -> None:
    code = (
        "import json, sys\n"
        + "".join(f"import {name}\n" for name in _present(CORE))
        + "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    loaded = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert loaded & (FORBIDDEN - {"socket"}) == set()
