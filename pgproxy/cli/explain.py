"""Placeholder for `pgproxy explain`; replaced by its implementation."""

import typer


def explain_command() -> None:
    """Not built yet."""
    raise typer.Exit(2)
