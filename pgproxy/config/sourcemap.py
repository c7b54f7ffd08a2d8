"""Positions of keys and values in a TOML source, by dotted key path.

`tomllib` returns plain dicts without positions. This module therefore scans
the source text a second time for key and table syntax only (TOML 1.0 table
headers, arrays of tables, dotted and quoted keys, inline tables and arrays)
and records where each key path starts. Values are skipped, not parsed.

A key path is written the way diagnostics show it: bare keys joined with
".", array indexes as "[N]", and keys that are not bare TOML keys in double
quotes, as in `clusters."api.v1".endpoints[1].weight`. `format_key_path` and
`parse_key_path` convert between that text and a tuple of str and int parts.

The scanner expects text that `tomllib` accepted. On other text it does not
raise; it skips what it cannot read, so some paths fall back to a parent.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable

KeyPart = str | int
KeyPath = tuple[KeyPart, ...]

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_BASIC_STRING_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_LITERAL_STRING_RE = re.compile(r"'[^'\n]*'")
_ML_BASIC_STRING_RE = re.compile(r'"""(?:[^\\]|\\.)*?"""(?:""?)?', re.DOTALL)
_ML_LITERAL_STRING_RE = re.compile(r"'''.*?'''(?:''?)?", re.DOTALL)
# A date-time may contain one space ("1979-05-27 07:32:00Z"); other scalars
# (numbers, booleans, dates) run up to whitespace, a separator or a comment.
_SCALAR_RE = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d[^\s,\]}#]*|[^\s,\]}#]+")
_SPACE_RE = re.compile(r"[ \t]*")
_GAP_RE = re.compile(r"(?:[ \t\r\n]+|#[^\n]*)*")
_INDEX_RE = re.compile(r"\[(\d+)\]")


def format_key_path(parts: Iterable[KeyPart]) -> str:
    """Join key parts into a display path such as `routes[2].cluster`."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        key = (
            part
            if _BARE_KEY_RE.fullmatch(part)
            else json.dumps(part, ensure_ascii=False)
        )
        text += f".{key}" if text else key
    return text


def parse_key_path(text: str) -> KeyPath:
    """Split a display path into parts; the inverse of `format_key_path`.

    Raises ValueError when the text is not a key path.
    """
    parts: list[KeyPart] = []
    pos = 0
    while pos < len(text):
        if text[pos] == "." and parts:
            pos += 1
        if (match := _INDEX_RE.match(text, pos)) is not None:
            parts.append(int(match.group(1)))
        elif (match := _BASIC_STRING_RE.match(text, pos)) is not None:
            parts.append(json.loads(match.group()))
        elif (match := _BARE_KEY_RE.match(text, pos)) is not None:
            parts.append(match.group())
        else:
            raise ValueError(f"invalid key path {text!r} at offset {pos}")
        pos = match.end()
    return tuple(parts)


def _skip(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """Return the offset after what `pattern` (which may match empty) matches."""
    match = pattern.match(text, pos)
    return pos if match is None else match.end()


def _unquote_key(token: str) -> str:
    if token.startswith('"'):
        # TOML basic-string escapes are a superset of JSON's except \e and
        # \UXXXXXXXX, which tomllib already rejects or accepts identically
        # for keys written in practice.
        try:
            return str(json.loads(token))
        except ValueError:
            return token[1:-1]
    if token.startswith("'"):
        return token[1:-1]
    return token


class SourceMap:
    """Line and column of every key and value in one TOML source.

    Lines and columns are 1-based; columns count characters (Unicode code
    points), not bytes. The source is scanned on the first lookup, so loading
    a valid config costs nothing here.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._lines = text.split("\n")
        self._keys: dict[KeyPath, int] | None = None
        self._values: dict[KeyPath, int] = {}
        self._duplicates: list[tuple[KeyPath, int, int]] = []
        self._line_starts: list[int] = []

    def __repr__(self) -> str:
        scanned = "unscanned" if self._keys is None else f"{len(self._keys)} keys"
        return f"<SourceMap {len(self._lines)} lines, {scanned}>"

    def locate(self, key_path: str) -> tuple[int, int, str | None]:
        """Return (line, column, source line) where `key_path` is defined.

        That is the key itself for `key = value`, the `[` of a table header,
        or the first character of an array element. A path that is not in
        the source falls back to its nearest parent. The root, and a path
        that cannot be parsed, map to line 1, column 1.
        """
        return self._find(key_path, values=False)

    def locate_value(self, key_path: str) -> tuple[int, int, str | None]:
        """Return the position of the value of `key_path`, else as `locate`."""
        return self._find(key_path, values=True)

    def find_duplicate(self, line: int) -> tuple[str, int, int] | None:
        """Return (key path, column, first definition's line) of a key that
        is defined again on `line`, or None.

        tomllib reports a duplicate key at the end of its value, without the
        key; this recovers both.
        """
        self._scan()
        for path, offset, first in self._duplicates:
            found_line, column, _ = self._position(offset)
            if found_line == line:
                return format_key_path(path), column, self._position(first)[0]
        return None

    def source_line(self, line: int) -> str | None:
        """Return the text of a 1-based line without its line ending."""
        if not 1 <= line <= len(self._lines):
            return None
        return self._lines[line - 1].rstrip("\r")

    def _find(self, key_path: str, *, values: bool) -> tuple[int, int, str | None]:
        keys = self._scan()
        try:
            parts = parse_key_path(key_path)
        except ValueError:
            parts = ()
        if values and parts in self._values:
            return self._position(self._values[parts])
        while parts:
            if parts in keys:
                return self._position(keys[parts])
            parts = parts[:-1]
        return 1, 1, self.source_line(1)

    def _position(self, offset: int) -> tuple[int, int, str | None]:
        index = bisect.bisect_right(self._line_starts, offset) - 1
        line = index + 1
        return line, offset - self._line_starts[index] + 1, self.source_line(line)

    def _scan(self) -> dict[KeyPath, int]:
        if self._keys is None:
            self._line_starts = [0]
            self._line_starts.extend(
                match.end() for match in re.finditer("\n", self._text)
            )
            scanner = _Scanner(self._text)
            scanner.run()
            self._keys = scanner.keys
            self._values = scanner.values
            self._duplicates = scanner.duplicates
        return self._keys


class _Scanner:
    """One pass over TOML text that records key and value offsets."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.keys: dict[KeyPath, int] = {}
        self.values: dict[KeyPath, int] = {}
        # Keys created only as the prefix of a longer key or header, whose
        # recorded offset a later explicit definition replaces.
        self.implicit: set[KeyPath] = set()
        self.array_lengths: dict[KeyPath, int] = {}
        # (path, offset of the repeated definition, offset of the first one)
        self.duplicates: list[tuple[KeyPath, int, int]] = []

    def run(self) -> None:
        table: KeyPath = ()
        while True:
            self.pos = _skip(_GAP_RE, self.text, self.pos)
            if self.pos >= len(self.text):
                return
            start = self.pos
            if self.text.startswith("[[", start):
                table = self._array_table_header()
            elif self.text[start] == "[":
                table = self._table_header()
            else:
                self._key_value(table)
            self._skip_line_if_stuck(start)

    def _skip_line_if_stuck(self, start: int) -> None:
        if self.pos <= start:
            end = self.text.find("\n", start)
            self.pos = len(self.text) if end < 0 else end + 1

    def _record(self, path: KeyPath, offset: int, *, implicit: bool) -> None:
        if not implicit and path in self.keys and path not in self.implicit:
            self.duplicates.append((path, offset, self.keys[path]))
        if path not in self.keys or (path in self.implicit and not implicit):
            self.keys[path] = offset
            if implicit:
                self.implicit.add(path)
            else:
                self.implicit.discard(path)

    def _resolve(self, keys: list[tuple[str, int]]) -> KeyPath:
        """Map header keys to a concrete path, through open arrays of tables."""
        path: KeyPath = ()
        for name, offset in keys:
            path = (*path, name)
            self._record(path, offset, implicit=True)
            if path in self.array_lengths:
                path = (*path, self.array_lengths[path] - 1)
        return path

    def _table_header(self) -> KeyPath:
        bracket = self.pos
        self.pos += 1
        keys = self._dotted_key()
        self.pos = self._skip_past("]")
        path = self._resolve(keys)
        self._record(path, bracket, implicit=False)
        return path

    def _array_table_header(self) -> KeyPath:
        bracket = self.pos
        self.pos += 2
        keys = self._dotted_key()
        self.pos = self._skip_past("]]")
        if not keys:
            return ()
        parent = self._resolve(keys[:-1])
        array = (*parent, keys[-1][0])
        self._record(array, keys[-1][1], implicit=False)
        index = self.array_lengths.get(array, 0)
        self.array_lengths[array] = index + 1
        element = (*array, index)
        self._record(element, bracket, implicit=False)
        return element

    def _skip_past(self, closing: str) -> int:
        """Return the offset after `closing` on the current line, else the line end."""
        line_end = self.text.find("\n", self.pos)
        if line_end < 0:
            line_end = len(self.text)
        end = self.text.find(closing, self.pos, line_end)
        return line_end if end < 0 else end + len(closing)

    def _dotted_key(self) -> list[tuple[str, int]]:
        """Read `a."b.c".d` at pos; return each part with its offset."""
        keys: list[tuple[str, int]] = []
        while True:
            self.pos = _skip(_SPACE_RE, self.text, self.pos)
            match = (
                _BASIC_STRING_RE.match(self.text, self.pos)
                or _LITERAL_STRING_RE.match(self.text, self.pos)
                or _BARE_KEY_RE.match(self.text, self.pos)
            )
            if match is None:
                return keys
            keys.append((_unquote_key(match.group()), self.pos))
            self.pos = _skip(_SPACE_RE, self.text, match.end())
            if not self.text.startswith(".", self.pos):
                return keys
            self.pos += 1

    def _key_value(self, table: KeyPath) -> None:
        keys = self._dotted_key()
        if not keys or not self.text.startswith("=", self.pos):
            return
        path = table
        for name, offset in keys[:-1]:
            path = (*path, name)
            self._record(path, offset, implicit=True)
        path = (*path, keys[-1][0])
        self._record(path, keys[-1][1], implicit=False)
        self.pos = _skip(_SPACE_RE, self.text, self.pos + 1)
        self._value(path)

    def _value(self, path: KeyPath) -> None:
        self.values[path] = self.pos
        char = self.text[self.pos : self.pos + 1]
        if char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            pattern = _SCALAR_RE
            if self.text.startswith('"""', self.pos):
                pattern = _ML_BASIC_STRING_RE
            elif self.text.startswith("'''", self.pos):
                pattern = _ML_LITERAL_STRING_RE
            elif char == '"':
                pattern = _BASIC_STRING_RE
            elif char == "'":
                pattern = _LITERAL_STRING_RE
            match = pattern.match(self.text, self.pos)
            if match is not None:
                self.pos = match.end()

    def _array(self, path: KeyPath) -> None:
        self.pos += 1
        index = 0
        while self.pos < len(self.text):
            self.pos = _skip(_GAP_RE, self.text, self.pos)
            char = self.text[self.pos : self.pos + 1]
            if char in ("]", ""):
                self.pos += 1
                return
            if char == ",":
                self.pos += 1
                continue
            start = self.pos
            element = (*path, index)
            self._record(element, start, implicit=False)
            self._value(element)
            index += 1
            if self.pos <= start:
                return

    def _inline_table(self, path: KeyPath) -> None:
        self.pos += 1
        while self.pos < len(self.text):
            self.pos = _skip(_GAP_RE, self.text, self.pos)
            char = self.text[self.pos : self.pos + 1]
            if char in ("}", ""):
                self.pos += 1
                return
            if char == ",":
                self.pos += 1
                continue
            start = self.pos
            self._key_value(path)
            if self.pos <= start:
                return
