"""Tests of the choice between the compiled request path and its source.

The suite runs against the compiled modules and the C modules (the response
head reader and the request head check), because an install with a C
compiler serves with them. `PGPROXY_PURE=1` runs it against the .py files
and the Python code alone.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pgproxy
from pgproxy import compiled

PACKAGE = Path(pgproxy.__file__).resolve().parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
NAMES = ("pgproxy.alpha", "pgproxy.beta")
C_NAME = "pgproxy.gamma"


def _tree(root: Path, built: tuple[str, ...]) -> None:
    """Write a source per name in NAMES, an extension per `built` name, the record."""
    (root / "pgproxy").mkdir()
    for name in NAMES:
        (root / (name.replace(".", "/") + ".py")).write_text(f"NAME = {name!r}\n")
    for name in built:
        (root / (name.replace(".", "/") + SUFFIX)).write_bytes(b"")
    if built:
        (root / (compiled.LIBRARY.replace(".", "/") + SUFFIX)).write_bytes(b"")
    compiled.record_sources(NAMES, str(root), c_modules=())


def _c_tree(root: Path) -> Path:
    """Write the C source of C_NAME, an extension for it, and the record."""
    (root / "pgproxy").mkdir()
    source = root / "pgproxy" / "gamma.c"
    source.write_text("/* gamma */\n")
    (root / ("pgproxy/gamma" + SUFFIX)).write_bytes(b"")
    compiled.record_sources((), str(root), c_modules=(C_NAME,))
    return source


def test_stale_reason_none_when_nothing_built(tmp_path: Path) -> None:
    _tree(tmp_path, built=())

    assert compiled.stale_reason(NAMES, str(tmp_path)) is None


def test_stale_reason_none_for_recorded_sources(tmp_path: Path) -> None:
    _tree(tmp_path, built=NAMES)

    assert compiled.stale_reason(NAMES, str(tmp_path)) is None


def test_stale_reason_names_edited_source(tmp_path: Path) -> None:
    _tree(tmp_path, built=NAMES)
    edited = tmp_path / "pgproxy" / "beta.py"
    edited.write_text("NAME = 'edited'\n")

    reason = compiled.stale_reason(NAMES, str(tmp_path))

    assert reason == f"{edited} changed after it was compiled"


def test_stale_reason_none_without_sources(tmp_path: Path) -> None:
    _tree(tmp_path, built=NAMES)
    for name in NAMES:
        (tmp_path / (name.replace(".", "/") + ".py")).unlink()

    assert compiled.stale_reason(NAMES, str(tmp_path)) is None


def test_stale_reason_names_missing_build(tmp_path: Path) -> None:
    _tree(tmp_path, built=("pgproxy.alpha",))

    reason = compiled.stale_reason(NAMES, str(tmp_path))

    assert reason == "pgproxy.beta is not compiled while others are"


def test_stale_reason_names_missing_library(tmp_path: Path) -> None:
    _tree(tmp_path, built=NAMES)
    library = compiled.built_path(compiled.LIBRARY, str(tmp_path))
    assert library is not None
    os.unlink(library)

    reason = compiled.stale_reason(NAMES, str(tmp_path))

    assert reason == f"{compiled.LIBRARY} is not compiled while others are"


def test_stale_reason_names_missing_record(tmp_path: Path) -> None:
    _tree(tmp_path, built=NAMES)
    (tmp_path / "pgproxy" / compiled.SOURCES_RECORD).unlink()

    reason = compiled.stale_reason(NAMES, str(tmp_path))

    assert reason == f"pgproxy/{compiled.SOURCES_RECORD} is missing or unreadable"


def test_c_stale_reason_none_for_recorded_source(tmp_path: Path) -> None:
    _c_tree(tmp_path)

    assert compiled.c_stale_reason(C_NAME, str(tmp_path)) is None


def test_c_stale_reason_names_edited_source(tmp_path: Path) -> None:
    source = _c_tree(tmp_path)
    source.write_text("/* edited */\n")

    reason = compiled.c_stale_reason(C_NAME, str(tmp_path))

    assert reason == f"{source} changed after it was compiled"


def test_c_stale_reason_names_unrecorded_source(tmp_path: Path) -> None:
    source = _c_tree(tmp_path)
    compiled.record_sources((), str(tmp_path), c_modules=())

    reason = compiled.c_stale_reason(C_NAME, str(tmp_path))

    assert reason == f"{source} changed after it was compiled"


def test_c_stale_reason_names_missing_record(tmp_path: Path) -> None:
    _c_tree(tmp_path)
    (tmp_path / "pgproxy" / compiled.SOURCES_RECORD).unlink()

    reason = compiled.c_stale_reason(C_NAME, str(tmp_path))

    assert reason == f"pgproxy/{compiled.SOURCES_RECORD} is missing or unreadable"


def _import_report(env: dict[str, str], cwd: Path) -> list[str]:
    """Import one compiled module in a new interpreter; return its file and state."""
    code = (
        "import pgproxy.compiled as c, pgproxy.proxy.exchange as m; "
        "print(m.__file__); print(c.REQUEST_PATH); print(c.STALE_REASON)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def _environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PGPROXY_PURE"}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def test_installed_request_path_is_compiled() -> None:
    # Fails on an install without a C compiler: the suite must test the
    # compiled modules unless it is asked to test the source.
    if os.environ.get("PGPROXY_PURE") == "1":
        assert compiled.REQUEST_PATH == "python (PGPROXY_PURE=1)"
        return
    assert compiled.REQUEST_PATH == "compiled", (
        f"the request path runs as {compiled.REQUEST_PATH!r}: install pgproxy "
        "with a C compiler (pip install -e .), or run the tests with PGPROXY_PURE=1"
    )


def test_pure_environment_imports_source(tmp_path: Path) -> None:
    env = _environment(PGPROXY_PURE="1", PYTHONPATH=str(PACKAGE.parent))

    module_file, request_path, stale = _import_report(env, tmp_path)

    assert module_file == str(PACKAGE / "proxy" / "exchange.py")
    assert request_path == "python (PGPROXY_PURE=1)"
    assert stale == "None"


def test_edited_source_wins_over_build(tmp_path: Path) -> None:
    copy = tmp_path / "copy" / "pgproxy"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    built = compiled.built_path("pgproxy.proxy.headers", str(copy.parent))
    assert built is not None, "the package under test is not compiled"
    edited = copy / "proxy" / "headers.py"
    edited.write_text(edited.read_text() + "\n# edited\n")
    env = _environment(PYTHONPATH=str(copy.parent))

    module_file, request_path, stale = _import_report(env, tmp_path)

    assert module_file == str(copy / "proxy" / "exchange.py")
    assert request_path == f"python ({edited} changed after it was compiled)"
    assert stale == f"{edited} changed after it was compiled"


def test_missing_first_build_imports_source(tmp_path: Path) -> None:
    # The first module's build is the one checked before any other.
    copy = tmp_path / "copy" / "pgproxy"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    first = compiled.COMPILED_MODULES[0]
    built = compiled.built_path(first, str(copy.parent))
    assert built is not None, "the package under test is not compiled"
    os.unlink(built)
    env = _environment(PYTHONPATH=str(copy.parent))

    module_file, request_path, stale = _import_report(env, tmp_path)

    reason = f"{first} is not compiled while others are"
    assert module_file == str(copy / "proxy" / "exchange.py")
    assert request_path == f"python ({reason})"
    assert stale == reason


def _reader_report(env: dict[str, str], cwd: Path) -> list[str]:
    """Read a head in a new interpreter, and return which reader read it."""
    # Only the Python reader records names in the layout, so the layout shows
    # which reader read the head, independent of the module constants.
    code = (
        "import sys, pgproxy.compiled as c, pgproxy.proxy.response_head as r; "
        "layout = r.FieldLayout(); "
        "head = r.read_response_head("
        "b'HTTP/1.1 200 OK\\r\\nServer: x\\r\\nContent-Length: 0\\r\\n\\r\\n', "
        "65536, False, layout); "
        "assert head is not None and head.status == 200; "
        "print(len(layout.prefixes)); print(c.MODULE in c.C_MODULES_USED); "
        "print(c.MODULE in sys.modules); print(r.__file__); print(c.REQUEST_PATH)"
    ).replace("c.MODULE", repr(compiled.C_RESPONSE_HEAD))
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def _copy_package(tmp_path: Path) -> Path:
    copy = tmp_path / "copy" / "pgproxy"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_installed_build_reads_heads_in_c(tmp_path: Path) -> None:
    env = _environment(PYTHONPATH=str(PACKAGE.parent))

    places, chosen, imported, module_file, request_path = _reader_report(env, tmp_path)

    assert request_path == "compiled"
    assert chosen == "True"
    assert imported == "True"
    assert places == "0"
    assert module_file.endswith(SUFFIX)


def test_pure_environment_reads_heads_in_python(tmp_path: Path) -> None:
    env = _environment(PGPROXY_PURE="1", PYTHONPATH=str(PACKAGE.parent))

    places, chosen, imported, module_file, request_path = _reader_report(env, tmp_path)

    assert request_path == "python (PGPROXY_PURE=1)"
    assert chosen == "False"
    assert imported == "False"
    assert places == "2"
    assert module_file == str(PACKAGE / "proxy" / "response_head.py")


def test_edited_c_source_reads_heads_in_python(tmp_path: Path) -> None:
    copy = _copy_package(tmp_path)
    assert compiled.built_path(compiled.C_RESPONSE_HEAD, str(copy.parent)) is not None
    edited = copy / "proxy" / "_response_head.c"
    edited.write_text(edited.read_text() + "\n/* edited */\n")
    env = _environment(PYTHONPATH=str(copy.parent))

    places, chosen, imported, module_file, request_path = _reader_report(env, tmp_path)

    reason = f"{edited} changed after it was compiled"
    assert request_path == f"compiled, response head reader in Python ({reason})"
    assert chosen == "False"
    assert imported == "False"
    assert places == "2"
    # The mypyc modules still run compiled.
    assert module_file.endswith(SUFFIX)


def test_missing_c_build_reads_heads_in_python(tmp_path: Path) -> None:
    copy = _copy_package(tmp_path)
    built = compiled.built_path(compiled.C_RESPONSE_HEAD, str(copy.parent))
    assert built is not None, "the C reader of the package under test is not built"
    os.unlink(built)
    env = _environment(PYTHONPATH=str(copy.parent))

    places, chosen, imported, module_file, request_path = _reader_report(env, tmp_path)

    reason = f"{compiled.C_RESPONSE_HEAD} is not built"
    assert request_path == f"compiled, response head reader in Python ({reason})"
    assert chosen == "False"
    assert imported == "False"
    assert places == "2"
    assert module_file.endswith(SUFFIX)


def _check_report(env: dict[str, str], cwd: Path) -> list[str]:
    """Check a request head in a new interpreter; return which check decided it."""
    # Only the Python check caches the field names it checks, so the cache
    # shows which check decided the head, independent of the module constants.
    code = (
        "import sys, pgproxy.compiled as c, pgproxy.proxy.framing as f; "
        "name = b'X-Check-Report'; "
        "info = f.check_request_head(b'GET', b'/', '1.1', "
        "[(b'Host', b'example.com'), (name, b'1')]); "
        "assert info.host == 'example.com'; "
        "print(name in f._TOKEN_NAMES); print(c.MODULE in c.C_MODULES_USED); "
        "print(c.MODULE in sys.modules); print(f.__file__); print(c.REQUEST_PATH)"
    ).replace("c.MODULE", repr(compiled.C_REQUEST_HEAD))
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.splitlines()


def test_installed_build_checks_requests_in_c(tmp_path: Path) -> None:
    env = _environment(PYTHONPATH=str(PACKAGE.parent))

    cached, chosen, imported, module_file, request_path = _check_report(env, tmp_path)

    assert request_path == "compiled"
    assert chosen == "True"
    assert imported == "True"
    assert cached == "False"
    assert module_file.endswith(SUFFIX)


def test_pure_environment_checks_requests_in_python(tmp_path: Path) -> None:
    env = _environment(PGPROXY_PURE="1", PYTHONPATH=str(PACKAGE.parent))

    cached, chosen, imported, module_file, request_path = _check_report(env, tmp_path)

    assert request_path == "python (PGPROXY_PURE=1)"
    assert chosen == "False"
    assert imported == "False"
    assert cached == "True"
    assert module_file == str(PACKAGE / "proxy" / "framing.py")


def test_edited_c_source_checks_requests_in_python(tmp_path: Path) -> None:
    copy = _copy_package(tmp_path)
    assert compiled.built_path(compiled.C_REQUEST_HEAD, str(copy.parent)) is not None
    edited = copy / "proxy" / "_request_head.c"
    edited.write_text(edited.read_text() + "\n/* edited */\n")
    env = _environment(PYTHONPATH=str(copy.parent))

    cached, chosen, imported, module_file, request_path = _check_report(env, tmp_path)

    reason = f"{edited} changed after it was compiled"
    assert request_path == f"compiled, request head check in Python ({reason})"
    assert chosen == "False"
    assert imported == "False"
    assert cached == "True"
    # The mypyc modules and the other C module still run compiled.
    assert module_file.endswith(SUFFIX)
    places, reader_chosen, *_ = _reader_report(env, tmp_path)
    assert reader_chosen == "True"
    assert places == "0"


def test_missing_c_builds_run_python(tmp_path: Path) -> None:
    copy = _copy_package(tmp_path)
    for name in compiled.C_MODULES:
        built = compiled.built_path(name, str(copy.parent))
        assert built is not None, f"{name} of the package under test is not built"
        os.unlink(built)
    env = _environment(PYTHONPATH=str(copy.parent))

    cached, chosen, imported, module_file, request_path = _check_report(env, tmp_path)

    assert request_path == (
        f"compiled, response head reader in Python ({compiled.C_RESPONSE_HEAD} "
        f"is not built), request head check in Python ({compiled.C_REQUEST_HEAD} "
        "is not built)"
    )
    assert chosen == "False"
    assert imported == "False"
    assert cached == "True"
    assert module_file.endswith(SUFFIX)


def test_build_type_check_needs_no_dependencies(tmp_path: Path) -> None:
    # pip compiles in an environment without pgproxy's dependencies: mypyc's
    # type check fails there unless the build options leave them out.
    bare = tmp_path / "bare"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(bare)],
        check=True,
        timeout=60,
    )
    paths = [name.replace(".", "/") + ".py" for name in compiled.COMPILED_MODULES]
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--python-executable",
        str(bare / "bin" / "python"),
        "--cache-dir",
        str(tmp_path / "cache"),
        *compiled.BUILD_OPTIONS,
        *paths,
    ]

    result = subprocess.run(
        command,
        cwd=PACKAGE.parent,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_stale_c_module_logs_warning(tmp_path: Path) -> None:
    # In a new interpreter: importing pgproxy.server.main blocks and ignores
    # SIGHUP in the importing process, which later tests would inherit.
    reason = "pgproxy/proxy/_request_head.c changed after it was compiled"
    code = (
        "import logging, pgproxy.compiled as c; "
        "logging.basicConfig(level=logging.WARNING, format='%(message)s'); "
        "from pgproxy.server.main import log_request_path; "
        f"c.STALE_REASON = None; c.C_STALE_REASONS = {{c.C_REQUEST_HEAD: {reason!r}}}; "
        "log_request_path()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_environment(PYTHONPATH=str(PACKAGE.parent)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert "running the request head check in Python" in result.stderr
    assert reason in result.stderr
    assert compiled.C_REQUEST_HEAD in result.stderr
