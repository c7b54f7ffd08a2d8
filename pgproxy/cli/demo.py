"""Placeholder for `pgproxy demo`; replaced by its implementation."""

import typer


def demo_command() -> None:
    """Not built yet."""
    raise typer.Exit(2)
