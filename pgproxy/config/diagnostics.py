"""Diagnostics: one problem found in a config file, with its place in the file.

Every stage that checks a config (TOML syntax, model validation, the graph's
semantic checks) reports a list of `Diagnostic` values instead of raising on
the first problem, so `pgproxy validate` can show all of them in one run.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Severity(str, enum.Enum):
    """How bad a diagnostic is; warnings become fatal with `validate --strict`."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem at `file:line:col`, on the dotted key path `key`.

    `line` and `column` are 1-based; 0 means the position is unknown (for
    example a problem with the file as a whole). `code` is a stable short
    identifier (such as `unknown-key`) that tests and CI filters can rely on.
    """

    file: str
    line: int
    column: int
    key: str
    code: str
    message: str
    severity: Severity = Severity.ERROR
    hint: str | None = None
    # The offending source line, shown under the message in text output.
    source_line: str | None = field(default=None, compare=False)

    def render(self) -> str:
        """Format as `file:line:col: key: message` (the text output's first line).

        An unknown position is left out, as in `file: message`, and so is an
        unknown column, as in `file:line: message`.
        """
        key = f"{self.key}: " if self.key else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{self.location()}: {key}{self.message}{hint}"

    def location(self) -> str:
        """Return `file:line:col`, without the parts that are unknown (0)."""
        if not self.line:
            return self.file
        if not self.column:
            return f"{self.file}:{self.line}"
        return f"{self.file}:{self.line}:{self.column}"
