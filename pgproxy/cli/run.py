"""Placeholder for `pgproxy run`; replaced by its implementation."""

import typer


def run_command() -> None:
    """Not built yet."""
    raise typer.Exit(2)
