"""Build hook: compile the request path with mypyc when a C compiler is present.

Every other setting lives in pyproject.toml. The modules below run once or
more per proxied request. mypyc turns their typed Python into C extension
modules, which cuts the instructions pgproxy runs per request by about a
third (see docs/benchmarks.md). The .py files stay the source of truth:

- `PGPROXY_COMPILE=0` at install time skips compiling.
- A failed compile (no compiler, no Python headers) only warns, and the
  package installs as pure Python.
- At run time, `PGPROXY_PURE=1`, or a .py file that differs from the one
  compiled, makes pgproxy import the .py files instead (pgproxy/compiled.py).
"""

from __future__ import annotations

import os
import sys
import warnings

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pgproxy.compiled import (
    BUILD_OPTIONS,
    COMPILED_MODULES,
    GROUP_NAME,
    record_sources,
)


def compiled_extensions() -> list[object]:
    """Return mypyc's extension modules, or none when compiling is off."""
    if os.environ.get("PGPROXY_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    record_sources()
    paths = [name.replace(".", "/") + ".py" for name in COMPILED_MODULES]
    try:
        extensions = mypycify(
            [*BUILD_OPTIONS, *paths], opt_level="3", group_name=GROUP_NAME
        )
    except SystemExit:
        # mypyc exits when its type check fails; the .py files still work.
        warnings.warn(
            "mypyc could not compile the request path; installing pgproxy "
            "as pure Python",
            stacklevel=1,
        )
        return []
    for extension in extensions:
        # setuptools then warns about a failed compile instead of failing.
        extension.optional = True
    return extensions


setup(ext_modules=compiled_extensions())
