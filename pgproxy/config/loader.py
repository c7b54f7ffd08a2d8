"""Load a config file: bytes to text to TOML to a validated `Config`.

`load_config` either returns a Config with the SourceMap of its text, or
raises ConfigError carrying every problem found, each as a positioned
Diagnostic. It never lets an OSError, UnicodeDecodeError, TOMLDecodeError or
ValidationError escape. Diagnostic codes, stable for tests and CI filters:

    file-unreadable   the file is missing, not a regular file (a directory,
                      FIFO, device or socket), or cannot be read
    file-too-large    larger than MAX_CONFIG_BYTES
    file-binary       contains NUL bytes
    file-encoding     not valid UTF-8
    file-empty        no keys at all (empty, blank or only comments)
    toml-syntax       not valid TOML
    toml-too-deep     arrays or inline tables nested deeper than MAX_NESTING_DEPTH
    duplicate-key     a key or table defined twice
    unknown-key       a key the model does not have (with "did you mean")
    missing-key       a required key is absent
    invalid-type      a value of the wrong TOML type
    invalid-value     a value of the right type that is not accepted
    conflicting-keys  keys that may not be set together

Only `file-unreadable` means the file was not checked at all; the CLI exits
with 2 for it and with 1 for every other error.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

from pydantic import ValidationError

from pgproxy.config.diagnostics import Diagnostic
from pgproxy.config.models import Config
from pgproxy.config.nesting import measure_nesting
from pgproxy.config.sourcemap import SourceMap
from pgproxy.config.validation import diagnostics_from_error
from pgproxy.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_NESTING_DEPTH",
    "UNREADABLE_CODES",
    "decode_config",
    "load_config",
    "parse_config",
    "read_config_bytes",
]

# A config with thousands of routes is a few hundred KiB; anything near this
# limit is almost certainly the wrong file, and reading it whole would cost
# memory for nothing.
MAX_CONFIG_BYTES = 10 * 1024 * 1024
# Arrays and inline tables nested deeper than this are rejected before
# parsing, because tomllib (and the source map) recurse once or more per
# level. With CPython 3.11's default recursion limit, tomllib parses 300
# levels and raises RecursionError at 500. A pgproxy config nests
# three levels at most (routes, respond, headers).
MAX_NESTING_DEPTH = 100
# Maximum length of the source line shown under a diagnostic, because a
# deeply nested value can fill thousands of columns.
MAX_SHOWN_LINE = 120
UNREADABLE_CODES = frozenset({"file-unreadable"})
# Syntax errors reported per file. After each one the loader blanks the bad
# line and parses again, which finds independent mistakes on later lines.
MAX_SYNTAX_ERRORS = 10

_POSITION_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_END_RE = re.compile(r"\s*\(at end of document\)$")
# Fixes for tomllib's messages (Python 3.11-3.13 wording), by message start.
_SYNTAX_HINTS = (
    ("Invalid value", 'a value is missing, or a string lacks quotes: key = "value"'),
    (
        "Illegal character '\\n'",
        'close the string on its line, or use """ for a multi-line string',
    ),
    ("Unterminated string", "add the closing quote"),
    ('Expected "\'"', "a 'literal string' is not closed; close it on its line"),
    ("Unclosed array", 'separate the items with "," and end the array with "]"'),
    ("Unclosed inline table", 'end the inline table with "}" on the same line'),
    ("Expected ']'", 'end the table header with "]"'),
    ("Expected '=' after a key", "write key = value; quote a key that has spaces"),
    (
        "Invalid initial character for a key part",
        "write key = value; an inline table { ... } must fit on one line",
    ),
)
_DUPLICATE_MESSAGES = ("Cannot overwrite", "Cannot declare", "Duplicate")


def load_config(path: str | Path) -> tuple[Config, SourceMap]:
    """Read, parse and validate the config file at `path`.

    Raises ConfigError with every diagnostic found: file problems, TOML
    syntax errors, or model validation errors (positioned via the SourceMap).
    """
    file = str(path)
    data = read_config_bytes(path)
    return parse_config(decode_config(data, file), file)


def parse_config(text: str, file: str = "<config>") -> tuple[Config, SourceMap]:
    """Parse and validate config `text`; `file` names it in diagnostics."""
    source = SourceMap(text)
    nesting = measure_nesting(text)
    if nesting.depth > MAX_NESTING_DEPTH:
        message = (
            f"arrays or inline tables are nested {nesting.depth} levels deep; "
            f"at most {MAX_NESTING_DEPTH} are allowed"
        )
        raise ConfigError([_too_deep(file, text, nesting.offset, message)])
    try:
        document = _parse_toml(text, file, source)
        config = _validate(document, source, file)
    except RecursionError:
        # Only a call stack already deep when parsing starts gets here, since
        # MAX_NESTING_DEPTH stays far below the recursion limit.
        message = (
            f"the config is nested too deeply to parse ({nesting.depth} levels "
            "of arrays or inline tables)"
        )
        raise ConfigError([_too_deep(file, text, nesting.offset, message)]) from None
    return config, source


def _validate(document: dict[str, object], source: SourceMap, file: str) -> Config:
    if not document:
        message = "the config contains no keys"
        raise ConfigError([_file_diagnostic(file, "file-empty", message)])
    try:
        return Config.model_validate(document)
    except ValidationError as error:
        raise ConfigError(diagnostics_from_error(error, source, file)) from None


def read_config_bytes(path: str | Path) -> bytes:
    """Return the bytes of the config file at `path`, at most MAX_CONFIG_BYTES.

    Raises ConfigError (`file-unreadable` or `file-too-large`) without
    opening the path when it is not a regular file, so that a FIFO cannot
    block the read and a device such as /dev/zero is never read.
    """
    file = str(path)
    try:
        _check_regular(file, os.stat(path).st_mode)
        # O_NONBLOCK keeps open() from blocking when a FIFO replaced the
        # file after the stat; fstat then reports it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as stream:
            _check_regular(file, os.fstat(fd).st_mode)
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        message = "file not found"
        raise ConfigError(
            [_file_diagnostic(file, "file-unreadable", message)]
        ) from None
    except OSError as error:
        message = f"cannot read the file: {error.strerror or error}"
        raise ConfigError(
            [_file_diagnostic(file, "file-unreadable", message)]
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        message = f"the file is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB"
        hint = "a pgproxy config is a few hundred KiB at most; check the path"
        raise ConfigError([_file_diagnostic(file, "file-too-large", message, hint)])
    return data


def _check_regular(file: str, mode: int) -> None:
    """Raise ConfigError unless `mode` is the mode of a regular file."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        message = "is a directory, not a file"
        hint = None
    else:
        message = f"not a regular file: it is {_file_kind(mode)}"
        hint = "pass the path of a TOML file; save piped output to a file first"
    raise ConfigError([_file_diagnostic(file, "file-unreadable", message, hint)])


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _too_deep(file: str, text: str, offset: int, message: str) -> Diagnostic:
    """Point at the key whose value nests arrays or inline tables too deeply."""
    line, column = _text_position(text, offset)
    source_line = text.split("\n", line)[line - 1]
    if len(source_line) > MAX_SHOWN_LINE:
        source_line = source_line[:MAX_SHOWN_LINE] + "..."
    return Diagnostic(
        file,
        line,
        column,
        "",
        "toml-too-deep",
        message,
        hint="a pgproxy config never needs more than a few levels; check the value",
        source_line=source_line if column <= MAX_SHOWN_LINE else None,
    )


def _text_position(text: str, offset: int) -> tuple[int, int]:
    """Return the 1-based line and column of a character offset."""
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


def decode_config(data: bytes, file: str) -> str:
    """Decode config bytes as UTF-8; raises ConfigError for empty or binary data."""
    if not data.strip():
        raise ConfigError([_file_diagnostic(file, "file-empty", "the file is empty")])
    nul = data.find(b"\0")
    if nul >= 0:
        line, column = _byte_position(data, nul)
        message = f"the file looks binary: NUL byte at offset {nul}"
        hint = "a config is a UTF-8 TOML text file; check the path"
        raise ConfigError(
            [Diagnostic(file, line, column, "", "file-binary", message, hint=hint)]
        )
    try:
        # A BOM is allowed and dropped; TOML itself forbids U+FEFF.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line, column = _byte_position(data, error.start)
        bad = data[error.start : error.start + 1].hex()
        message = f"invalid UTF-8: byte 0x{bad} at offset {error.start}"
        hint = "TOML files must be UTF-8; convert it, e.g. with iconv -t UTF-8"
        raise ConfigError(
            [Diagnostic(file, line, column, "", "file-encoding", message, hint=hint)]
        ) from None


def _byte_position(data: bytes, offset: int) -> tuple[int, int]:
    """Return the 1-based line and character column of a byte offset."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    prefix = data[line_start:offset].decode("utf-8", errors="replace")
    return data.count(b"\n", 0, offset) + 1, len(prefix) + 1


def _parse_toml(text: str, file: str, source: SourceMap) -> dict[str, object]:
    """Parse TOML, collecting up to MAX_SYNTAX_ERRORS syntax errors."""
    diagnostics: list[Diagnostic] = []
    lines = text.split("\n")
    while True:
        try:
            document = tomllib.loads("\n".join(lines))
        except tomllib.TOMLDecodeError as error:
            diagnostic = _syntax_diagnostic(str(error), file, source, len(lines))
            diagnostics.append(diagnostic)
            at_end = _END_RE.search(str(error)) is not None
            if at_end or not _blank_line(lines, diagnostic, diagnostics):
                raise ConfigError(diagnostics) from None
            continue
        if diagnostics:
            raise ConfigError(diagnostics)
        return document


def _blank_line(
    lines: list[str], diagnostic: Diagnostic, diagnostics: list[Diagnostic]
) -> bool:
    """Neutralise the line of a syntax error; False when parsing should stop.

    Stopping is right when the error is not after the previous one, because
    another pass would only repeat it or report its consequences.
    """
    previous = diagnostics[-2].line if len(diagnostics) > 1 else 0
    number = diagnostic.line
    if len(diagnostics) >= MAX_SYNTAX_ERRORS or not previous < number <= len(lines):
        return False
    # A broken table header becomes a header of its own, so the keys under it
    # do not land in the previous table and report false duplicates.
    stripped = lines[number - 1].lstrip()
    lines[number - 1] = f"[pgproxy-recovery-{number}]" if stripped[:1] == "[" else ""
    return True


def _syntax_diagnostic(
    message: str, file: str, source: SourceMap, line_count: int
) -> Diagnostic:
    line, column = 0, 0
    if (match := _POSITION_RE.search(message)) is not None:
        line, column = int(match.group(1)), int(match.group(2))
        message = message[: match.start()]
    elif (match := _END_RE.search(message)) is not None:
        # Point after the last non-blank line, where the missing text belongs.
        line = line_count
        while line > 1 and not (source.source_line(line) or "").strip():
            line -= 1
        column = len(source.source_line(line) or "") + 1
        message = message[: match.start()] + " at the end of the file"
    if message.startswith(_DUPLICATE_MESSAGES):
        return _duplicate_diagnostic(file, source, line, column)
    hint = next(
        (hint for prefix, hint in _SYNTAX_HINTS if message.startswith(prefix)),
        "see the TOML 1.0 syntax at https://toml.io/en/v1.0.0",
    )
    if message == "Illegal character '\\n'":
        message = "unterminated string"
    message = message[:1].lower() + message[1:]
    return Diagnostic(
        file,
        line,
        column,
        "",
        "toml-syntax",
        f"invalid TOML: {message}",
        hint=hint,
        source_line=source.source_line(line),
    )


def _duplicate_diagnostic(
    file: str, source: SourceMap, line: int, column: int
) -> Diagnostic:
    key = ""
    message = "invalid TOML: a key or table is defined twice"
    found = source.find_duplicate(line)
    if found is not None:
        key, column, first_line = found
        message = f"invalid TOML: already defined on line {first_line}"
    return Diagnostic(
        file,
        line,
        column,
        key,
        "duplicate-key",
        message,
        hint="remove one of the definitions, or rename it",
        source_line=source.source_line(line),
    )


def _file_diagnostic(
    file: str, code: str, message: str, hint: str | None = None
) -> Diagnostic:
    return Diagnostic(file, 0, 0, "", code, message, hint=hint)
