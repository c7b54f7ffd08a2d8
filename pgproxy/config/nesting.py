"""Nesting depth of TOML arrays and inline tables, measured without recursion.

tomllib parses nested arrays and inline tables recursively, so a value nested
a few hundred levels deep raises RecursionError instead of TOMLDecodeError.
The loader therefore measures the depth first with this flat scan, which
skips strings and comments and counts the brackets and braces outside them.
Table headers (`[a]`, `[[a]]`) count too, but never more than two levels.

The scan expects TOML text. On text with syntax errors it still ends and
never raises, but it may then measure a depth that tomllib would not reach.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Characters where the depth changes, or where a string or comment starts.
_EVENT_RE = re.compile(r"""[\[\]{}#"']""")
# Multi-line strings may end with up to two extra quotes, as in """a"""".
_ML_BASIC_STRING_RE = re.compile(r'"""(?:[^\\]|\\.)*?"""(?:""?)?', re.DOTALL)
_ML_LITERAL_STRING_RE = re.compile(r"'''.*?'''(?:''?)?", re.DOTALL)
# An unterminated one-line string ends at the end of its line.
_BASIC_STRING_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"?')
_LITERAL_STRING_RE = re.compile(r"'[^'\n]*'?")


@dataclass(frozen=True, slots=True)
class Nesting:
    """The most deeply nested value of a TOML text.

    `offset` is where the outermost bracket or brace of that value starts,
    which is on the line of its key, because TOML puts a value on the line
    of its key. `depth` is 0 for a text without arrays or tables.
    """

    depth: int
    offset: int


def measure_nesting(text: str) -> Nesting:
    """Return the deepest nesting of arrays and inline tables in `text`."""
    deepest = Nesting(0, 0)
    depth = 0
    outer = 0
    pos = 0
    while (match := _EVENT_RE.search(text, pos)) is not None:
        char = match.group()
        pos = match.end()
        if char == "#":
            newline = text.find("\n", pos)
            pos = len(text) if newline < 0 else newline
        elif char in "\"'":
            pos = _skip_string(text, match.start())
        elif char in "[{":
            if depth == 0:
                outer = match.start()
            depth += 1
            if depth > deepest.depth:
                deepest = Nesting(depth, outer)
        else:
            depth = max(depth - 1, 0)
    return deepest


def _skip_string(text: str, start: int) -> int:
    """Return the offset after the string that starts at `start`."""
    if text.startswith('"""', start):
        pattern = _ML_BASIC_STRING_RE
    elif text.startswith("'''", start):
        pattern = _ML_LITERAL_STRING_RE
    elif text[start] == '"':
        pattern = _BASIC_STRING_RE
    else:
        pattern = _LITERAL_STRING_RE
    match = pattern.match(text, start)
    # Only an unterminated multi-line string fails to match; it runs to the end.
    return len(text) if match is None else match.end()
