"""The command-line entry point, before any command runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = (
    "import signal, sys\n"
    "sys.argv = ['pgproxy', *sys.argv[1:]]\n"
    "import pgproxy.cli.app\n"
    "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)\n"
)


@pytest.mark.parametrize(
    ("args", "ignored"), [(["run", "x.toml"], True), (["validate", "x.toml"], False)]
)
def test_run_ignores_sighup_from_its_first_import(
    args: list[str], ignored: bool
) -> None:
    # A reload signal that arrives while `pgproxy run` still imports typer must
    # not end it; other commands keep the default, so a closed terminal ends them.
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == str(ignored)
