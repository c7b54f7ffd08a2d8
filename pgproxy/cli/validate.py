"""Placeholder for `pgproxy validate`; replaced by its implementation."""

import typer


def validate_command() -> None:
    """Not built yet."""
    raise typer.Exit(2)
