"""The `pgproxy` command line: one typer app, one module per command."""

from __future__ import annotations

import typer

from pgproxy.cli import check_upstreams, demo, explain, run, schema, validate

app = typer.Typer(
    name="pgproxy",
    help="Declarative HTTP/1.1 load balancer and reverse proxy, configured by one TOML "
    "file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("validate")(validate.validate_command)
app.command("check-upstreams", cls=check_upstreams.CheckUpstreamsCommand)(
    check_upstreams.check_upstreams_command
)
app.command("run")(run.run_command)
app.command("schema")(schema.schema_command)
app.command("demo")(demo.demo_command)
app.command("explain")(explain.explain_command)


def main() -> None:
    """Run the pgproxy command line."""
    app()
