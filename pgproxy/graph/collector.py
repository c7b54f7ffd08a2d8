"""The diagnostics collected while one config file is checked and built."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from pgproxy.config.diagnostics import Diagnostic, Severity


class Collector:
    """Diagnostics of one build, all pointing into one source file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[Diagnostic] = []

    def error(self, key: str, code: str, message: str, hint: str | None = None) -> None:
        self._add(key, code, message, hint, Severity.ERROR)

    def warning(
        self, key: str, code: str, message: str, hint: str | None = None
    ) -> None:
        self._add(key, code, message, hint, Severity.WARNING)

    def _add(
        self, key: str, code: str, message: str, hint: str | None, severity: Severity
    ) -> None:
        self.items.append(
            Diagnostic(self.source, 0, 0, key, code, message, severity, hint)
        )

    @property
    def has_errors(self) -> bool:
        """Whether any diagnostic so far is an error."""
        return any(item.severity is Severity.ERROR for item in self.items)


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """Return a hint naming the choice closest to `name`, or listing them all."""
    options = sorted(choices)
    close = difflib.get_close_matches(name, options, n=1)
    if close:
        return f'did you mean "{close[0]}"?'
    if options:
        return "defined: " + ", ".join(options)
    return None
