"""Load a config in a child process, so serving processes never import pydantic.

Validating a config needs pydantic and the config models, about 13 MiB of
resident memory that a process keeps for its whole life once imported. The
serving processes (a single `pgproxy run`, the supervisor and every worker)
therefore run `python -m pgproxy.graph.compile PATH` for the first load and
for every reload, and unpickle the graph it prints. The same bytes are what
the supervisor sends its workers, so every worker installs exactly the graph
that was validated.

Outcomes: a LoadedGraph, or ConfigError with the file's diagnostics. A loader
that crashes, is killed or runs past LOAD_TIMEOUT also raises ConfigError, with
one diagnostic naming the cause, so a reload keeps the running config.
"""

from __future__ import annotations

import os
import pickle
import signal
import site
import subprocess
import sys
from pathlib import Path

import anyio

import pgproxy
from pgproxy.config.diagnostics import Diagnostic
from pgproxy.errors import ConfigError
from pgproxy.graph.types import LoadedGraph

# A config of 20,000 routes loads in about 1.5 s on a 2-core VM. The limit
# stops only a loader that hangs, such as one on a stalled network mount.
LOAD_TIMEOUT = 60.0
LOADER_MODULE = "pgproxy.graph.compile"


def loader_command(path: str) -> list[str]:
    """Return the command line of the loader child for `path`."""
    return [sys.executable, "-m", LOADER_MODULE, path]


def package_environment() -> dict[str, str]:
    """Return this process's environment with this pgproxy first on PYTHONPATH.

    A process started with `python -m pgproxy...` then imports the same
    pgproxy as this one, also when this one was found only because a
    launcher (a zipapp, a vendoring wrapper) put it on sys.path.
    """
    env = dict(os.environ)
    root = str(Path(pgproxy.__file__).resolve().parent.parent)
    previous = env.get("PYTHONPATH")
    if _site_folder(root):
        # The child finds site-packages anyway. On PYTHONPATH it would come
        # before the standard library, so a backport installed there would
        # shadow it.
        return env
    if not previous:
        env["PYTHONPATH"] = root
    elif previous.split(os.pathsep)[0] != root:
        env["PYTHONPATH"] = f"{root}{os.pathsep}{previous}"
    return env


def _site_folder(root: str) -> bool:
    """Return whether `root` is a site-packages folder of this interpreter."""
    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return any(os.path.realpath(folder) == root for folder in folders)


def loader_env() -> dict[str, str]:
    """Return the child's environment: this process's, finding the same pgproxy."""
    return package_environment()


def load_config(path: str) -> tuple[LoadedGraph, bytes]:
    """Load `path` in a child process; return the graph and its pickled form.

    Raises ConfigError with every diagnostic of the file, or with one that
    gives the reason the loader failed.
    """
    try:
        done = subprocess.run(
            loader_command(path),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env=loader_env(),
            timeout=LOAD_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise _loader_failed(path, f"took longer than {LOAD_TIMEOUT:g} s") from None
    return _outcome(path, done.returncode, done.stdout, done.stderr)


async def load_config_async(path: str) -> tuple[LoadedGraph, bytes]:
    """Like `load_config`, without blocking the event loop."""
    try:
        with anyio.fail_after(LOAD_TIMEOUT):
            done = await anyio.run_process(
                loader_command(path),
                stdin=subprocess.DEVNULL,
                env=loader_env(),
                check=False,
            )
    except TimeoutError:
        raise _loader_failed(path, f"took longer than {LOAD_TIMEOUT:g} s") from None
    return _outcome(path, done.returncode, done.stdout, done.stderr)


def decode_loaded(payload: bytes, path: str) -> LoadedGraph:
    """Unpickle a loader's output; raise ConfigError when it contains diagnostics."""
    try:
        kind, value = pickle.loads(payload)
    except Exception as error:  # any unpickling failure means a broken loader
        raise _loader_failed(path, f"printed no result ({error})") from None
    if kind == "ok" and isinstance(value, LoadedGraph):
        return value
    if kind == "error":
        raise ConfigError(list(value))
    raise _loader_failed(path, f"printed an unknown result {kind!r}")


def _outcome(
    path: str, returncode: int, stdout: bytes, stderr: bytes
) -> tuple[LoadedGraph, bytes]:
    if returncode < 0:
        raise _loader_failed(path, f"was killed by {_signal_name(-returncode)}")
    if returncode != 0:
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        detail = lines[-1] if lines else "no message"
        raise _loader_failed(path, f"exited with code {returncode}: {detail}")
    return decode_loaded(stdout, path), stdout


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _loader_failed(path: str, reason: str) -> ConfigError:
    return ConfigError(
        [
            Diagnostic(
                path,
                0,
                0,
                "",
                "loader-failed",
                f"the config loader process {reason}",
                hint="run `pgproxy validate` on the file for details",
            )
        ]
    )
