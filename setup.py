"""Build hook: compile the request path with mypyc when a C compiler is present.

Every other setting is in pyproject.toml. The modules listed in
pgproxy/compiled.py run once or more per proxied request. mypyc turns their
typed Python into C extension modules, which cuts the instructions pgproxy
runs per request by more than half (see docs/architecture.md, "The compiled
request path"). Two more extension modules, the response head reader and the
request head check's fast path, are written in C (pgproxy/proxy/*.c,
compiled.C_MODULES), and are built the same way. The .py files stay the
source of truth:

- `PGPROXY_COMPILE=0` at install time skips compiling.
- A failed compile (no compiler, no Python headers) only warns, and the
  package installs as pure Python. A failed build of a C module alone
  leaves the compiled modules with the Python code it replaces.
- At run time, `PGPROXY_PURE=1`, or a .py file that differs from the one
  compiled, makes pgproxy import the .py files instead, and a .c file that
  differs from the one built turns its C module off (pgproxy/compiled.py).
"""

from __future__ import annotations

import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pgproxy.compiled import (
    BUILD_OPTIONS,
    C_MODULES,
    COMPILED_MODULES,
    GROUP_NAME,
    record_sources,
)


def compiled_extensions() -> list[object]:
    """Return the C modules and mypyc's extension modules, or none when off."""
    if os.environ.get("PGPROXY_COMPILE", "1") == "0":
        return []
    record_sources()
    # optional: setuptools then warns about a failed compile instead of failing.
    handwritten = [
        Extension(name, [name.replace(".", "/") + ".c"], optional=True)
        for name in C_MODULES
    ]
    return [*handwritten, *mypyc_extensions()]


def mypyc_extensions() -> list[object]:
    """Return mypyc's extension modules, or none when mypyc fails."""
    paths = [name.replace(".", "/") + ".py" for name in COMPILED_MODULES]
    try:
        from mypyc.build import mypycify

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


# All compiled modules are one C file in one shared library, but with the
# defaults for shared libraries every call between its functions goes
# through the PLT and none can be inlined, because another library could
# interpose them. Nothing outside calls them: the modules reach each other
# through capsules, and Python finds only the PyInit_ functions, which
# PyMODINIT_FUNC exports explicitly. callgrind, 100-byte request over 50
# connections: 42.8k to 41.5k instructions, L1 instruction misses 2,398 to
# 2,176, L1 data read misses 842 to 649.
FAST_CALL_FLAGS = ("-fno-semantic-interposition", "-fvisibility=hidden", "-fno-plt")


class BuildExt(build_ext):
    """build_ext that adds FAST_CALL_FLAGS the compiler accepts."""

    def build_extensions(self) -> None:
        flags = [flag for flag in FAST_CALL_FLAGS if self._accepts(flag)]
        for extension in self.extensions:
            extension.extra_compile_args = [*extension.extra_compile_args, *flags]
        super().build_extensions()

    def _accepts(self, flag: str) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "probe.c")
            with open(source, "w", encoding="ascii") as file:
                file.write("int probe(void) { return 0; }\n")
            try:
                self.compiler.compile(
                    [source], output_dir=tmp, extra_postargs=[flag, "-Werror"]
                )
            except Exception:  # distutils' CompileError, under several names
                return False
        return True


setup(ext_modules=compiled_extensions(), cmdclass={"build_ext": BuildExt})
