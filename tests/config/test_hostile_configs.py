"""Hostile config files given to every command that reads a config.

Each command runs as a child process with a deadline, so a command that
hangs fails the test instead of stalling the suite. Whatever the input, a
command must print a positioned message and exit with its documented code,
never a Python traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMAND_TIMEOUT = 10.0

VALID = """\
[listeners.main]
address = "127.0.0.1:0"

[[routes]]
cluster = "c"

[clusters.c]
endpoints = ["127.0.0.1:1"]
"""

# Deep enough to exceed Python's default recursion limit in a recursive parser.
NESTING_DEPTH = 2000


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `pgproxy ARGS` with a deadline; fail the test when it does not exit."""
    command = [sys.executable, "-m", "pgproxy", *args]
    try:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        pass
    pytest.fail(
        f"`pgproxy {' '.join(args)}` did not exit within {COMMAND_TIMEOUT}s",
        pytrace=False,
    )


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pgproxy.toml"
    path.write_text(text)
    return path


def _assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, (
        f"a Python traceback was printed; its end:\n{output[-1500:]}"
    )


NESTED_CONFIGS = {
    "array": VALID + "junk = " + "[" * NESTING_DEPTH + "]" * NESTING_DEPTH + "\n",
    "inline-table": VALID
    + "junk = "
    + "{a = " * NESTING_DEPTH
    + "1"
    + "}" * NESTING_DEPTH
    + "\n",
}


@pytest.mark.parametrize("shape", sorted(NESTED_CONFIGS))
def test_validate_deeply_nested_value(tmp_path: Path, shape: str) -> None:
    path = _write(tmp_path, NESTED_CONFIGS[shape])

    result = _run("validate", str(path))

    _assert_no_traceback(result)
    assert result.returncode == 1, (
        f"expected exit 1 (invalid config), got {result.returncode}; "
        f"stdout:\n{result.stdout}"
    )
    assert f"{path}:9:" in result.stdout, (
        f"expected a diagnostic positioned on line 9, the nested value; "
        f"stdout:\n{result.stdout}"
    )


@pytest.mark.parametrize("command", ["explain", "check-upstreams", "run"])
def test_other_commands_deeply_nested_value(tmp_path: Path, command: str) -> None:
    path = _write(tmp_path, NESTED_CONFIGS["array"])
    args = [command, str(path)]
    if command == "explain":
        args.append("GET http://test.local/")

    result = _run(*args)

    _assert_no_traceback(result)
    assert result.returncode != 0, f"`pgproxy {command}` accepted the config"


def test_validate_deeply_nested_regex(tmp_path: Path) -> None:
    depth = 500
    regex = "(a|" * depth + "a" + ")" * depth
    text = VALID + f'\n[[routes]]\npath_regex = "^/{regex}$"\ncluster = "c"\n'
    path = _write(tmp_path, text)

    result = _run("validate", str(path))

    _assert_no_traceback(result)
    assert result.returncode == 1, (
        f"expected exit 1 for a regex Python cannot compile, got "
        f"{result.returncode}; stdout:\n{result.stdout}"
    )
    assert f"{path}:11:" in result.stdout, (
        f"expected a diagnostic on line 11, the path_regex; stdout:\n{result.stdout}"
    )


def test_validate_fifo_unreadable(tmp_path: Path) -> None:
    fifo = tmp_path / "pgproxy.toml"
    os.mkfifo(fifo)

    result = _run("validate", str(fifo))

    _assert_no_traceback(result)
    assert result.returncode == 2, (
        f"expected exit 2 (unreadable file) for a FIFO, got {result.returncode}; "
        f"stdout:\n{result.stdout}"
    )
    assert str(fifo) in result.stdout, (
        f"the message does not name the file; stdout:\n{result.stdout}"
    )


def test_run_fifo_config_exits_1(tmp_path: Path) -> None:
    fifo = tmp_path / "pgproxy.toml"
    os.mkfifo(fifo)

    result = _run("run", str(fifo))

    _assert_no_traceback(result)
    assert result.returncode == 1, (
        f"expected exit 1 (startup failure) for a FIFO, got {result.returncode}; "
        f"stderr:\n{result.stderr}"
    )
