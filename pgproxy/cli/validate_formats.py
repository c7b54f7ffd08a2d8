"""Output formats of `pgproxy validate`: text, JSON, GitHub annotations, SARIF.

Each format receives the same list of FileResult values and writes every
diagnostic; the JSON shape (JSON_VERSION) and the SARIF subset are documented
in docs/validate.md and only change with a new version number.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

import pgproxy
from pgproxy.config.diagnostics import Diagnostic, Severity
from pgproxy.config.loader import UNREADABLE_CODES

JSON_VERSION = 1
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_TAB_SIZE = 4


@dataclass(frozen=True, slots=True)
class FileResult:
    """Every diagnostic of one config file, sorted by position."""

    file: str
    diagnostics: tuple[Diagnostic, ...]

    @property
    def errors(self) -> int:
        return sum(d.severity is Severity.ERROR for d in self.diagnostics)

    @property
    def warnings(self) -> int:
        return sum(d.severity is Severity.WARNING for d in self.diagnostics)

    @property
    def unreadable(self) -> bool:
        return any(d.code in UNREADABLE_CODES for d in self.diagnostics)

    def valid(self, *, strict: bool) -> bool:
        """Return whether the file passes: no error, and no warning if strict."""
        return self.errors == 0 and not (strict and self.warnings)


def write_text(console: Console, results: Sequence[FileResult], strict: bool) -> None:
    """Print each diagnostic with its source line and a caret, then a summary."""
    for result in results:
        for diagnostic in result.diagnostics:
            _print_diagnostic(console, diagnostic)
    errors = sum(r.errors for r in results)
    warnings = sum(r.warnings for r in results)
    style = "bold green"
    if errors or (strict and warnings):
        style = "bold red"
    elif warnings:
        style = "bold yellow"
    console.print(summarize(results, strict), style=style)


def summarize(results: Sequence[FileResult], strict: bool) -> str:
    """Return the closing line, as in `2 files checked: 1 error, 0 warnings`."""
    errors = sum(r.errors for r in results)
    warnings = sum(r.warnings for r in results)
    summary = f"{_plural(len(results), 'file')} checked: {_plural(errors, 'error')}"
    summary += f", {_plural(warnings, 'warning')}"
    if strict and warnings:
        summary += " (--strict: warnings fail)"
    return summary


def _print_diagnostic(console: Console, diagnostic: Diagnostic) -> None:
    is_error = diagnostic.severity is Severity.ERROR
    head = Text(diagnostic.location(), style="bold")
    head.append(": ")
    if diagnostic.key:
        head.append(f"{diagnostic.key}: ", style="cyan")
    if not is_error:
        head.append("warning: ", style="bold yellow")
    head.append(diagnostic.message, style="red" if is_error else "yellow")
    head.append(f" [{diagnostic.code}]", style="dim")
    console.print(head)
    if diagnostic.line and diagnostic.column and diagnostic.source_line is not None:
        gutter = str(diagnostic.line)
        source = diagnostic.source_line.expandtabs(_TAB_SIZE)
        before = diagnostic.source_line[: diagnostic.column - 1]
        caret = " " * len(before.expandtabs(_TAB_SIZE)) + "^"
        console.print(Text(f"  {gutter} | ", style="blue") + Text(source))
        pad = " " * len(gutter)
        console.print(Text(f"  {pad} | ", style="blue") + Text(caret, style="bold"))
    if diagnostic.hint:
        console.print(Text("  hint: ", style="bold") + Text(diagnostic.hint))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def render_json(results: Sequence[FileResult], strict: bool) -> str:
    """Return the versioned JSON document described in docs/validate.md."""
    document = {
        "version": JSON_VERSION,
        "valid": all(r.valid(strict=strict) for r in results),
        "strict": strict,
        "summary": {
            "files": len(results),
            "errors": sum(r.errors for r in results),
            "warnings": sum(r.warnings for r in results),
        },
        "files": [
            {
                "file": r.file,
                "valid": r.valid(strict=strict),
                "errors": r.errors,
                "warnings": r.warnings,
            }
            for r in results
        ],
        "diagnostics": [
            _diagnostic_json(d) for result in results for d in result.diagnostics
        ],
    }
    return json.dumps(document, indent=2, ensure_ascii=False)


def _diagnostic_json(diagnostic: Diagnostic) -> dict[str, Any]:
    return {
        "file": diagnostic.file,
        "line": diagnostic.line,
        "column": diagnostic.column,
        "key": diagnostic.key,
        "code": diagnostic.code,
        "severity": diagnostic.severity.value,
        "message": diagnostic.message,
        "hint": diagnostic.hint,
        "source_line": diagnostic.source_line,
    }


def render_github(results: Sequence[FileResult], strict: bool) -> str:
    """Return one GitHub Actions workflow command per diagnostic, then a summary.

    The runner turns `::error file=F,line=L,col=C,title=T::message` into an
    annotation on that line of the pull request's diff, and prints other
    lines (the summary) in the job log as they are.
    """
    lines = []
    for result in results:
        for diagnostic in result.diagnostics:
            lines.append(_github_command(diagnostic))
    lines.append(summarize(results, strict))
    return "\n".join(lines)


def _github_command(diagnostic: Diagnostic) -> str:
    command = "error" if diagnostic.severity is Severity.ERROR else "warning"
    properties = [f"file={_escape_property(diagnostic.file)}"]
    if diagnostic.line:
        properties.append(f"line={diagnostic.line}")
        properties.append(f"col={diagnostic.column}")
    title = diagnostic.key or diagnostic.code
    properties.append(f"title={_escape_property(title)}")
    message = f"{diagnostic.message} [{diagnostic.code}]"
    if diagnostic.hint:
        message += f"\nhint: {diagnostic.hint}"
    return f"::{command} {','.join(properties)}::{_escape_data(message)}"


def _escape_data(text: str) -> str:
    # The runner decodes these three in a command's message.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    # Property values additionally end at "," and the message starts at "::".
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render_sarif(results: Sequence[FileResult]) -> str:
    """Return a minimal SARIF 2.1.0 log with one result per diagnostic."""
    diagnostics = [d for result in results for d in result.diagnostics]
    codes = sorted({d.code for d in diagnostics})
    run = {
        "tool": {
            "driver": {
                "name": "pgproxy",
                "version": pgproxy.__version__,
                "rules": [{"id": code} for code in codes],
            }
        },
        "columnKind": "unicodeCodePoints",
        "results": [_sarif_result(d, codes.index(d.code)) for d in diagnostics],
    }
    log = {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}
    return json.dumps(log, indent=2, ensure_ascii=False)


def _sarif_result(diagnostic: Diagnostic, rule_index: int) -> dict[str, Any]:
    text = diagnostic.message
    if diagnostic.key:
        text = f"{diagnostic.key}: {text}"
    if diagnostic.hint:
        text += f" ({diagnostic.hint})"
    location: dict[str, Any] = {"artifactLocation": {"uri": _uri(diagnostic.file)}}
    if diagnostic.line:
        location["region"] = {
            "startLine": diagnostic.line,
            "startColumn": max(diagnostic.column, 1),
        }
    return {
        "ruleId": diagnostic.code,
        "ruleIndex": rule_index,
        "level": "error" if diagnostic.severity is Severity.ERROR else "warning",
        "message": {"text": text},
        "locations": [{"physicalLocation": location}],
    }


def _uri(file: str) -> str:
    path = Path(file)
    if path.is_absolute():
        return path.as_uri()
    return urllib.parse.quote(path.as_posix())
