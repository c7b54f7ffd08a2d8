"""Placeholder for `pgproxy schema`; replaced by its implementation."""

import typer


def schema_command() -> None:
    """Not built yet."""
    raise typer.Exit(2)
