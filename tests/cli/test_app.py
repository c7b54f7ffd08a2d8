"""The command-line entry point, before any command runs."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

PROBE = (
    "import signal, sys\n"
    "sys.argv = ['pgproxy', *sys.argv[1:]]\n"
    "import pgproxy.cli.app\n"
    "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)\n"
    "print(signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, set()))\n"
)


def _default_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("args", "held"), [(["run", "x.toml"], True), (["validate", "x.toml"], False)]
)
def test_run_holds_sighup_from_its_first_import(args: list[str], held: bool) -> None:
    # A reload signal that arrives while `pgproxy run` still imports typer must
    # not end it, and stays pending for the serving process; other commands
    # keep the default, so a closed terminal ends them.
    # The probe starts with SIGHUP at its default, as from a shell: a suite
    # run under nohup would otherwise hand down SIG_IGN.
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=_default_sighup,
    )
    assert done.stdout.split() == [str(held), str(held)]
