"""The modules mypyc compiles, and the switch back to their Python source.

setup.py compiles COMPILED_MODULES into C extension modules that sit next to
their .py files and share one library, named after GROUP_NAME. Python's
import system prefers an extension module to a .py file of the same name, so
a module edited after its build would silently run the old code. So
`choose_modules()`, run when pgproxy is imported, installs an import
hook that loads every compiled module from its .py file instead when:

- PGPROXY_PURE=1 is set, or
- a .py file differs from the one its module was compiled from (setup.py
  records their SHA-256 in SOURCES_RECORD), or
- a compiled module, or the library that contains their code, is missing while
  others are built (the compiled classes derive from each other, so the set
  is used whole or not at all).

The extension modules in C_MODULES are written in C by hand: the response
head reader (pgproxy/proxy/_response_head.c) and the request head check's
fast path (pgproxy/proxy/_request_head.c). They run only with the compiled
modules, and the module that uses each imports it when its name is in
`C_MODULES_USED`. The compiled modules run with the Python code instead of
a C module when that module is not built, or when its .c file differs from
the one it was built from (also recorded in SOURCES_RECORD). Each C module
is chosen on its own.

`REQUEST_PATH` then names the code that runs, for the start-up log.
"""

from __future__ import annotations

# Imported by every pgproxy command: only modules that the interpreter has
# loaded already at start-up, and hashlib and json once a build exists.
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

COMPILED_MODULES = (
    "pgproxy.proxy.framing",
    "pgproxy.proxy.response_head",
    "pgproxy.proxy.headers",
    "pgproxy.proxy.header_rules",
    "pgproxy.proxy.pool",
    "pgproxy.proxy.upstream",
    "pgproxy.proxy.retry",
    "pgproxy.proxy.exchange_state",
    "pgproxy.proxy.failures",
    "pgproxy.proxy.relay",
    "pgproxy.proxy.exchange",
    "pgproxy.proxy.downstream_state",
    "pgproxy.proxy.downstream_parsing",
    "pgproxy.proxy.downstream",
    "pgproxy.proxy.service",
    "pgproxy.proxy.respond",
    "pgproxy.observability.batch",
    "pgproxy.observability.access",
    "pgproxy.graph.settings",
    "pgproxy.graph.types",
    "pgproxy.graph.paths",
    "pgproxy.graph.routing",
    "pgproxy.balancing.base",
    "pgproxy.balancing.round_robin",
    "pgproxy.balancing.consistent_hash",
    "pgproxy.balancing.hash_key",
    "pgproxy.balancing.least_request",
    "pgproxy.balancing.random",
    "pgproxy.health.endpoint",
    "pgproxy.health.reports",
    "pgproxy.health.state",
    "pgproxy.observability.metrics",
)
# The modules written in C, each built from the .c file next to it, with
# what each does in place of Python code, for REQUEST_PATH and the log.
C_RESPONSE_HEAD = "pgproxy.proxy._response_head"
C_REQUEST_HEAD = "pgproxy.proxy._request_head"
C_MODULES = {
    C_RESPONSE_HEAD: "response head reader",
    C_REQUEST_HEAD: "request head check",
}
GROUP_NAME = "pgproxy._native"
# The shared library that mypyc builds for the group: the code of every
# compiled module is in it, and each module's own extension only loads it.
LIBRARY = GROUP_NAME + "__mypyc"
# mypy options of the compile. pip builds in an isolated environment that has
# none of pgproxy's dependencies yet, so the type check must not look for them:
# it types httptools and rich as Any, whatever the target environment holds.
BUILD_OPTIONS = ("--no-site-packages", "--ignore-missing-imports")
PURE_ENV = "PGPROXY_PURE"
# Next to this file: {module name: SHA-256 of the .py or .c file it was built from}.
SOURCES_RECORD = "_native_sources.json"

# "compiled", "compiled, response head reader in Python (REASON)" (one such
# part per C module not used), "python", or "python (REASON)" once
# choose_modules() has run.
REQUEST_PATH = "python"
# Set when compiled modules exist but are not used for a reason to warn about.
STALE_REASON: str | None = None
# The modules of C_MODULES that may be imported, set by choose_modules().
C_MODULES_USED: frozenset[str] = frozenset()
# {C module: reason} for each C module that is built but not used for a
# reason to warn about.
C_STALE_REASONS: dict[str, str] = {}

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_path(name: str, root: str = _ROOT) -> str:
    """Return the .py file of module `name` under `root`."""
    return os.path.join(root, *name.split(".")) + ".py"


def c_source_path(name: str, root: str = _ROOT) -> str:
    """Return the .c file of C extension module `name` under `root`."""
    return os.path.join(root, *name.split(".")) + ".c"


def built_path(name: str, root: str = _ROOT) -> str | None:
    """Return the compiled extension of module `name` under `root`, if any."""
    base = os.path.join(root, *name.split("."))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(base + suffix):
            return base + suffix
    return None


def source_digest(path: str) -> str:
    """Return the SHA-256 of a file, in hex."""
    import hashlib

    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def record_sources(
    names: Sequence[str] = COMPILED_MODULES,
    root: str = _ROOT,
    c_modules: Sequence[str] = tuple(C_MODULES),
) -> None:
    """Write the digest of each module's source next to this file (setup.py).

    `c_modules` are C extension modules whose .c files are recorded.
    """
    import json

    digests = {name: source_digest(source_path(name, root)) for name in names}
    for c_module in c_modules:
        digests[c_module] = source_digest(c_source_path(c_module, root))
    record = os.path.join(root, "pgproxy", SOURCES_RECORD)
    with open(record, "w", encoding="utf-8") as file:
        json.dump(digests, file, indent=1, sort_keys=True)


def stale_reason(
    names: Sequence[str] = COMPILED_MODULES, root: str = _ROOT, library: str = LIBRARY
) -> str | None:
    """Return why the built modules must not be used, or None if they may be.

    None also when nothing is built: the .py files are then used anyway.
    """
    if all(built_path(name, root) is None for name in names):
        return None
    missing = [name for name in (*names, library) if built_path(name, root) is None]
    if missing:
        return f"{missing[0]} is not compiled while others are"
    digests = _read_record(root)
    if digests is None:
        return f"pgproxy/{SOURCES_RECORD} is missing or unreadable"
    for name in names:
        reason = _changed_source(source_path(name, root), digests.get(name))
        if reason is not None:
            return reason
    return None


def c_stale_reason(name: str, root: str = _ROOT) -> str | None:
    """Return why the built C module `name` must not be used, or None if it may be.

    The caller checks that it is built.
    """
    digests = _read_record(root)
    if digests is None:
        return f"pgproxy/{SOURCES_RECORD} is missing or unreadable"
    return _changed_source(c_source_path(name, root), digests.get(name))


def _read_record(root: str) -> dict[str, str] | None:
    """Return the digests in SOURCES_RECORD under `root`, or None if unreadable."""
    import json

    try:
        with open(
            os.path.join(root, "pgproxy", SOURCES_RECORD), encoding="utf-8"
        ) as file:
            digests: dict[str, str] = json.load(file)
    except (OSError, ValueError):
        return None
    return digests


def _changed_source(source: str, recorded: str | None) -> str | None:
    """Return why `source` differs from the `recorded` digest, or None."""
    try:
        digest = source_digest(source)
    except OSError:
        return None  # installed without its source: only the build can run
    if recorded != digest:
        return f"{source} changed after it was compiled"
    return None


class _SourceFinder:
    """Finds the .py file of each compiled module, ahead of the extension.

    A meta path finder by its find_spec method: importlib.abc would import
    importlib.resources and pathlib into every command.
    """

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        path = source_path(fullname)
        loader = importlib.machinery.SourceFileLoader(fullname, path)
        spec = importlib.machinery.ModuleSpec(fullname, loader, origin=path)
        spec.has_location = True
        return spec


def choose_modules() -> None:
    """Decide once whether the compiled modules or their source are imported."""
    global REQUEST_PATH, STALE_REASON
    if any(isinstance(finder, _SourceFinder) for finder in sys.meta_path):
        return
    if os.environ.get(PURE_ENV) == "1":
        REQUEST_PATH = f"python ({PURE_ENV}=1)"
        sys.meta_path.insert(0, _SourceFinder())
        return
    # One stat in the usual cases, and the others only when the first is missing.
    if built_path(COMPILED_MODULES[0]) is None and not any(
        built_path(name) for name in COMPILED_MODULES[1:]
    ):
        REQUEST_PATH = "python (not compiled)"
        return
    STALE_REASON = stale_reason()
    if STALE_REASON is not None:
        REQUEST_PATH = f"python ({STALE_REASON})"
        sys.meta_path.insert(0, _SourceFinder())
        return
    REQUEST_PATH = "compiled"
    _choose_c_modules()


def _choose_c_modules() -> None:
    """Decide which C modules the compiled modules import."""
    global REQUEST_PATH, C_MODULES_USED
    used = []
    for name, work in C_MODULES.items():
        if built_path(name) is None:
            reason = f"{name} is not built"
        else:
            stale = c_stale_reason(name)
            if stale is None:
                used.append(name)
                continue
            reason = C_STALE_REASONS[name] = stale
        REQUEST_PATH += f", {work} in Python ({reason})"
    C_MODULES_USED = frozenset(used)
