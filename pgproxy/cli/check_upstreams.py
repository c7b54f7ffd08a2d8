"""Placeholder for `pgproxy check-upstreams`; replaced by its implementation."""

import typer


def check_upstreams_command() -> None:
    """Not built yet."""
    raise typer.Exit(2)
