"""`pgproxy validate CONFIG...`: check config files offline, for people and CI.

Each file goes through the whole load pipeline that `pgproxy run` uses
(read, TOML, models, graph build with its semantic checks), so a file that
validates is a file that loads. The TLS files it names are loaded only with
--check-files (see `pgproxy.cli.validate_files`), because CI jobs usually
lack them. Nothing is resolved or dialled: endpoints are only parsed, never
contacted.

Exit codes: 0 every file is valid; 1 some file has an error, or a warning
with --strict; 2 a usage error or a file that could not be read at all.
"""

from __future__ import annotations

import enum
from typing import Annotated

import typer

from pgproxy.cli.render import make_console
from pgproxy.cli.validate_formats import (
    FileResult,
    render_github,
    render_json,
    render_sarif,
    write_text,
)
from pgproxy.config.diagnostics import Diagnostic
from pgproxy.errors import ConfigError
from pgproxy.graph.build import FileCheck
from pgproxy.graph.load import load_graph

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2


class OutputFormat(str, enum.Enum):
    """How `validate` writes its findings."""

    TEXT = "text"
    JSON = "json"
    GITHUB = "github"
    SARIF = "sarif"


def validate_command(
    configs: Annotated[
        list[str],
        typer.Argument(
            metavar="CONFIG...", help="Config files to check.", show_default=False
        ),
    ],
    output_format: Annotated[
        OutputFormat,
        typer.Option(
            "--format",
            "-f",
            help="text for people; json for scripts; github for workflow "
            "annotations; sarif for code scanning.",
        ),
    ] = OutputFormat.TEXT,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail (exit 1) on warnings too.")
    ] = False,
    check_files: Annotated[
        bool,
        typer.Option(
            "--check-files",
            help="Also load the TLS certificates, private keys and CA files "
            "that the config names, as `pgproxy run` does, and report each one "
            "that is missing or does not load.",
        ),
    ] = False,
) -> None:
    """Check config files and report every error and warning, offline.

    Exit status: 0 valid, 1 invalid (or warnings with --strict), 2 usage
    error or unreadable file.
    """
    results = [check_file(path, check_files=check_files) for path in configs]
    # Machine formats go out as plain text: no styling, no wrapping.
    if output_format is OutputFormat.TEXT:
        write_text(make_console(), results, strict)
    elif output_format is OutputFormat.JSON:
        typer.echo(render_json(results, strict))
    elif output_format is OutputFormat.GITHUB:
        typer.echo(render_github(results, strict))
    else:
        typer.echo(render_sarif(results))
    raise typer.Exit(exit_code(results, strict=strict))


def check_file(path: str, *, check_files: bool = False) -> FileResult:
    """Run the whole load pipeline on one file and collect its diagnostics.

    With `check_files` the TLS files that the config names are loaded too.
    """
    file_check: FileCheck | None = None
    if check_files:
        # Imported here, so that plain validate runs (editors, pre-commit)
        # do not load the server and health modules (anyio, httpcore).
        from pgproxy.cli.validate_files import check_tls_files

        file_check = check_tls_files
    diagnostics: list[Diagnostic]
    try:
        loaded = load_graph(path, file_check)
    except ConfigError as error:
        diagnostics = error.diagnostics
    else:
        diagnostics = loaded.diagnostics
    ordered = sorted(diagnostics, key=lambda d: (d.line, d.column, d.key))
    return FileResult(path, tuple(ordered))


def exit_code(results: list[FileResult], *, strict: bool) -> int:
    """Return 2 if a file was unreadable, else 1 if any failed, else 0."""
    if any(result.unreadable for result in results):
        return EXIT_UNREADABLE
    if all(result.valid(strict=strict) for result in results):
        return EXIT_VALID
    return EXIT_INVALID
