"""SIGHUP held from the start of `pgproxy run`: pending, never fatal.

Each case runs in a child interpreter, because it changes the process's
signal mask and actions.
"""

from __future__ import annotations

import subprocess
import sys

# Holds SIGHUP, sends two to itself, then replaces itself with CHECK_SCRIPT.
HOLD_AND_EXEC = """
import os, signal, sys
from pgproxy.server.sighup import hold_sighup
hold_sighup()
os.kill(os.getpid(), signal.SIGHUP)
os.kill(os.getpid(), signal.SIGHUP)
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""

# Holds SIGHUP again, as the serving process does at import, and prints the
# state it finds.
CHECK_SCRIPT = """
import signal
from pgproxy.server.sighup import hold_sighup, sighup_held
hold_sighup()
print(signal.SIGHUP in signal.sigpending())
print(sighup_held())
print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)
"""


def test_pending_sighup_survives_exec() -> None:
    done = subprocess.run(
        [sys.executable, "-c", HOLD_AND_EXEC, CHECK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    pending, held, ignored = done.stdout.split()
    assert pending == "True"  # holding again did not discard it
    assert held == "True"
    assert ignored == "True"


def test_held_sighup_is_not_fatal() -> None:
    script = (
        "import os, signal\n"
        "from pgproxy.server.sighup import hold_sighup\n"
        "hold_sighup()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "print('alive')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alive"
