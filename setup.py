"""Build hook: compile the request path with mypyc when a C compiler is present.

Every other setting is in pyproject.toml. The modules listed in
pgproxy/compiled.py run once or more per proxied request. mypyc turns their
typed Python into C extension modules, which cuts the instructions pgproxy
runs per request by more than half (see docs/architecture.md, "The compiled
request path"). The .py files stay the source of truth:

- `PGPROXY_COMPILE=0` at install time skips compiling.
- A failed compile (no compiler, no Python headers) only warns, and the
  package installs as pure Python.
- At run time, `PGPROXY_PURE=1`, or a .py file that differs from the one
  compiled, makes pgproxy import the .py files instead (pgproxy/compiled.py).
"""

from __future__ import annotations

import os
import sys

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
    paths = [name.replace(".", "/") + ".py" for name in COMPILED_MODULES]
    try:
        from mypyc.build import mypycify

        record_sources()
        extensions = mypycify(
            [*BUILD_OPTIONS, *paths], opt_level="3", group_name=GROUP_NAME
        )
    except (Exception, SystemExit) as exc:
        # mypy exits on a type error; the package still installs, as Python.
        sys.stderr.write(f"warning: not compiling the request path: {exc!r}\n")
        return []
    for extension in extensions:
        # setuptools then warns about a failed compile instead of failing.
        extension.optional = True
    return extensions


setup(ext_modules=compiled_extensions())
