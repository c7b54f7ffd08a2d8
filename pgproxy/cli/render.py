"""Console output shared by the CLI commands.

Output is styled only when it goes to a terminal (rich decides, and honours
NO_COLOR and FORCE_COLOR); in a pipe or a CI log it is plain text. Long lines
are never wrapped, because paths and messages must stay greppable. Markup is
off, so text containing "[...]" (TOML table names) prints as written.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console


def make_console(*, stderr: bool = False) -> Console:
    """Create a Console on stdout (or stderr) for the current process streams.

    Create it inside the command, not at import time, so that it writes to the
    streams in place when the command runs (test runners replace them).
    """
    return Console(
        file=sys.stderr if stderr else sys.stdout,
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=True,
    )


def fail(message: str, exit_code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr and return the Exit to raise."""
    make_console(stderr=True).print(f"error: {message}", style="bold red")
    return typer.Exit(exit_code)
