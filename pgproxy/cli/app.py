"""The `pgproxy` command line: one typer app, one module per command.

A command's module is imported only when that command runs or a help page
lists it, so `pgproxy run` does not load what the other commands need
(httpcore for check-upstreams, rich tables, the validate output formats).
"""

from __future__ import annotations

import sys

from pgproxy.server.sighup import hold_sighup

# SIGHUP's default action ends a process. A process manager may send its
# reload signal right after starting `pgproxy run`, while the imports below
# still run. So `run` keeps it pending from here on, and the serving process
# that replaces this one reloads once it has installed its handler.
if sys.argv[1:2] == ["run"]:
    hold_sighup()

import importlib

import typer
from typer import _click  # typer's vendored click, which TyperGroup derives from
from typer.core import TyperCommand, TyperGroup
from typer.main import get_command_from_info
from typer.models import CommandInfo

# Command name -> (module under pgproxy.cli, command function, click class name
# in that module or ""), in the order `pgproxy --help` lists them.
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "validate": ("validate", "validate_command", ""),
    "check-upstreams": (
        "check_upstreams",
        "check_upstreams_command",
        "CheckUpstreamsCommand",
    ),
    "run": ("run", "run_command", ""),
    "schema": ("schema", "schema_command", ""),
    "demo": ("demo", "demo_command", ""),
    "explain": ("explain", "explain_command", ""),
}


class LazyCommandGroup(TyperGroup):
    """A group that imports a command's module the first time it is looked up."""

    def list_commands(self, ctx: _click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: _click.Context, cmd_name: str) -> TyperCommand | None:
        command = self.commands.get(cmd_name)
        if command is None and cmd_name in _COMMANDS:
            command = _load_command(cmd_name)
            self.add_command(command, cmd_name)
        return command if isinstance(command, TyperCommand) else None


def _load_command(name: str) -> TyperCommand:
    """Import the module of command `name` and build its click command."""
    module_name, function_name, class_name = _COMMANDS[name]
    module = importlib.import_module(f"pgproxy.cli.{module_name}")
    command_class = getattr(module, class_name) if class_name else None
    info = CommandInfo(name, cls=command_class, callback=getattr(module, function_name))
    command = get_command_from_info(
        info,
        pretty_exceptions_short=app.pretty_exceptions_short,
        rich_markup_mode=app.rich_markup_mode,
    )
    assert isinstance(command, TyperCommand)
    return command


app = typer.Typer(
    name="pgproxy",
    cls=LazyCommandGroup,
    help="Declarative HTTP/1.1 load balancer and reverse proxy, configured by one TOML "
    "file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    # typer builds a group, which LazyCommandGroup fills, only for an app
    # with a callback or several registered commands.
    pass


def main() -> None:
    """Run the pgproxy command line."""
    app()
