"""load_config: file problems, TOML syntax and model errors, all as Diagnostics."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

from pgproxy.config import loader
from pgproxy.config.diagnostics import Diagnostic
from pgproxy.config.loader import (
    MAX_CONFIG_BYTES,
    MAX_NESTING_DEPTH,
    MAX_SHOWN_LINE,
    load_config,
    parse_config,
)
from pgproxy.config.models import Config
from pgproxy.errors import ConfigError

VALID = """\
[listeners.public]
address = "127.0.0.1:8080"

[[routes]]
cluster = "api"

[clusters.api]
endpoints = ["127.0.0.1:9000"]
"""


def load_errors(path: Path) -> list[Diagnostic]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.diagnostics


def parse_errors(text: str) -> list[Diagnostic]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "test.toml")
    return caught.value.diagnostics


def write(tmp_path: Path, data: bytes | str) -> Path:
    path = tmp_path / "pgproxy.toml"
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def test_valid_config_loads(tmp_path: Path) -> None:
    config, source_map = load_config(write(tmp_path, VALID))

    assert isinstance(config, Config)
    assert config.listeners["public"].address == "127.0.0.1:8080"
    assert source_map.locate("clusters.api.endpoints[0]")[:2] == (8, 14)


def test_path_may_be_a_string(tmp_path: Path) -> None:
    config, _ = load_config(str(write(tmp_path, VALID)))

    assert list(config.clusters) == ["api"]


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    config, _ = load_config(write(tmp_path, b"\xef\xbb\xbf" + VALID.encode()))

    assert list(config.listeners) == ["public"]


def test_missing_file(tmp_path: Path) -> None:
    [error] = load_errors(tmp_path / "absent.toml")

    assert error.code == "file-unreadable"
    assert error.message == "file not found"
    assert error.file == str(tmp_path / "absent.toml")
    assert (error.line, error.column) == (0, 0)


def test_directory(tmp_path: Path) -> None:
    [error] = load_errors(tmp_path)

    assert error.code == "file-unreadable"
    assert "directory" in error.message


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, VALID)

    real_open = os.open

    def deny(file: str, *args: int, **kwargs: int) -> int:
        if Path(file) == path:
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    # Tests may run as root, which chmod cannot lock out.
    monkeypatch.setattr(os, "open", deny)
    [error] = load_errors(path)

    assert error.code == "file-unreadable"
    assert error.message == "cannot read the file: Permission denied"


@pytest.mark.timeout(10)
def test_fifo_rejected_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "pgproxy.toml"
    os.mkfifo(path)

    [error] = load_errors(path)

    assert error.code == "file-unreadable"
    assert error.message == "not a regular file: it is a FIFO (named pipe)"
    assert (error.line, error.column) == (0, 0)


def test_device_rejected_before_open(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = os.open

    def record(file: str, *args: int, **kwargs: int) -> int:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", record)
    [error] = load_errors(Path(os.devnull))

    assert error.message == "not a regular file: it is a character device"
    assert opened == []


def test_socket_rejected(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        [error] = load_errors(path)

    assert error.message == "not a regular file: it is a socket"


@pytest.mark.timeout(10)
def test_fifo_swapped_in_after_stat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "pgproxy.toml"
    os.mkfifo(path)
    regular = os.stat(write(tmp_path / "..", VALID))
    real_stat = os.stat

    def stale(file: str, *args: object, **kwargs: object) -> os.stat_result:
        return regular if Path(file) == path else real_stat(file)

    # The stat before opening reports a regular file, so only the check
    # after opening can catch the FIFO, and opening must not block.
    monkeypatch.setattr(os, "stat", stale)
    [error] = load_errors(path)

    assert error.message == "not a regular file: it is a FIFO (named pipe)"


@pytest.mark.parametrize("content", [b"", b"\n\n  \t\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    [error] = load_errors(write(tmp_path, content))

    assert error.code == "file-empty"
    assert error.message == "the file is empty"


def test_comments_only(tmp_path: Path) -> None:
    [error] = load_errors(write(tmp_path, "#:schema ./pgproxy.schema.json\n# todo\n"))

    assert error.code == "file-empty"
    assert error.message == "the config contains no keys"


def test_binary_garbage(tmp_path: Path) -> None:
    data = random.Random(7).randbytes(4096)
    data = data[:100] + b"\0" + data[100:]

    [error] = load_errors(write(tmp_path, data))

    assert error.code in ("file-binary", "file-encoding")
    assert error.line >= 1


def test_nul_byte(tmp_path: Path) -> None:
    [error] = load_errors(write(tmp_path, b"a = 1\nb = \0\n"))

    assert error.code == "file-binary"
    assert (error.line, error.column) == (2, 5)
    assert "offset 10" in error.message


def test_latin1_file(tmp_path: Path) -> None:
    data = '[listeners.public]\naddress = "0.0.0.0:80"  # café\n'.encode("latin-1")

    [error] = load_errors(write(tmp_path, data))

    assert error.code == "file-encoding"
    assert (error.line, error.column) == (2, 30)
    assert error.message == f"invalid UTF-8: byte 0xe9 at offset {data.index(0xE9)}"
    assert error.hint is not None and "UTF-8" in error.hint


def test_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    line = b"# padding padding padding padding padding padding padding padding\n"
    with path.open("wb") as stream:
        for _ in range(50 * 1024 * 1024 // len(line) + 1):
            stream.write(line)
    assert path.stat().st_size > 50 * 1024 * 1024

    [error] = load_errors(path)

    assert error.code == "file-too-large"
    assert error.message == f"the file is larger than {MAX_CONFIG_BYTES // 2**20} MiB"


def test_file_at_size_limit_is_read(tmp_path: Path) -> None:
    padding = "#" * (MAX_CONFIG_BYTES - len(VALID) - 1) + "\n"
    config, _ = load_config(write(tmp_path, VALID + padding))

    assert list(config.listeners) == ["public"]


def test_syntax_error_position() -> None:
    [error] = parse_errors('[listeners.public]\naddress = "0.0.0.0:80\n')

    assert error.code == "toml-syntax"
    assert (error.line, error.column) == (2, 22)
    assert error.message == "invalid TOML: unterminated string"
    assert error.source_line == 'address = "0.0.0.0:80'
    assert error.key == ""


def test_several_syntax_errors_are_all_reported() -> None:
    text = 'a = \nb = 1\nc = [1 2]\nd = "x\n[e\nf = 1\n'

    errors = parse_errors(text)

    assert [(e.line, e.code) for e in errors] == [
        (1, "toml-syntax"),
        (3, "toml-syntax"),
        (4, "toml-syntax"),
        (5, "toml-syntax"),
    ]


def test_syntax_recovery_is_bounded() -> None:
    errors = parse_errors("x = \n" * 50)

    assert len(errors) == 10


def test_broken_header_does_not_cause_false_duplicates() -> None:
    text = "[a]\nx = 1\n[b\nx = 2\n"

    errors = parse_errors(text)

    assert [(e.line, e.code) for e in errors] == [(3, "toml-syntax")]


def test_unterminated_multiline_string_at_end() -> None:
    [error] = parse_errors('a = 1\nb = """open\n\nmore text\n\n')

    assert error.code == "toml-syntax"
    assert error.message == "invalid TOML: unterminated string at the end of the file"
    assert (error.line, error.column) == (4, 10)


def test_duplicate_key() -> None:
    [error] = parse_errors("[server]\nworkers = 1\n\nworkers = 2\n")

    assert error.code == "duplicate-key"
    assert error.key == "server.workers"
    assert (error.line, error.column) == (4, 1)
    assert error.message == "invalid TOML: already defined on line 2"


def test_duplicate_inline_key() -> None:
    [error] = parse_errors("x = { a = 1, a = 2 }\n")

    assert error.code == "duplicate-key"
    assert error.key == "x.a"
    assert (error.line, error.column) == (1, 14)


def test_all_validation_errors_in_one_run() -> None:
    text = """\
[server]
workers = "x"
[listeners.a]
address = "nope"
[clusters.c]
endpoints = ["10.0.0.1:80", 7]
balancer = "fastest"
"""
    errors = parse_errors(text)

    assert [(e.line, e.column, e.key, e.code) for e in errors] == [
        (2, 11, "server.workers", "invalid-type"),
        (4, 11, "listeners.a.address", "invalid-value"),
        (6, 29, "clusters.c.endpoints[1]", "invalid-type"),
        (7, 12, "clusters.c.balancer", "invalid-value"),
    ]
    assert all(e.file == "test.toml" for e in errors)
    assert errors[0].source_line == 'workers = "x"'


def test_error_string_lists_count() -> None:
    with pytest.raises(ConfigError, match=r"\(and 1 more\)"):
        parse_config('[listeners.a]\naddress = 1\n[server]\nworkers = "x"\n')


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_never_escape_as_other_errors(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    alphabet = b"[]{}=\".,#\n \t abc123:_-'\xc3\xa9"
    data = bytes(rng.choice(alphabet) for _ in range(rng.randrange(1, 400)))
    path = write(tmp_path, data)

    try:
        load_config(path)
    except ConfigError as error:
        assert error.diagnostics
        assert all(d.code for d in error.diagnostics)


@pytest.mark.parametrize(
    ("value", "column"),
    [
        ("[" * 200 + "]" * 200, 8),
        ("{a = " * 200 + "1" + "}" * 200, 8),
        ("[\n" + "[" * 150 + "]" * 150 + "\n]", 8),
    ],
    ids=["array", "inline-table", "multi-line-array"],
)
def test_too_deep_value_positioned(value: str, column: int) -> None:
    [error] = parse_errors(VALID + "junk = " + value + "\n")

    assert error.code == "toml-too-deep"
    assert (error.line, error.column) == (9, column)
    assert error.source_line is not None
    assert error.source_line.startswith("junk = ")
    assert len(error.source_line) <= MAX_SHOWN_LINE + 3
    assert f"at most {MAX_NESTING_DEPTH} are allowed" in error.message


def test_nesting_at_limit_parses() -> None:
    depth = MAX_NESTING_DEPTH
    junk = "junk = " + "[" * depth + "]" * depth + "\n"

    [error] = parse_errors(VALID + junk)

    assert error.code == "unknown-key"


def test_deep_value_in_typed_key_is_invalid_type() -> None:
    depth = MAX_NESTING_DEPTH - 1
    text = VALID.replace(
        'cluster = "api"',
        'cluster = "api"\nheaders = { x = ' + "[" * depth + "]" * depth + " }",
    )

    [error] = parse_errors(text)

    assert error.code == "invalid-type"
    assert error.key == "routes[0].headers.x"


def test_recursion_error_becomes_diagnostic(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the depth limit tomllib itself recurses too deep.
    monkeypatch.setattr(loader, "MAX_NESTING_DEPTH", 10**6)
    depth = 5000

    [error] = parse_errors(VALID + "junk = " + "[" * depth + "]" * depth + "\n")

    assert error.code == "toml-too-deep"
    assert (error.line, error.column) == (9, 8)
    assert "too deeply to parse" in error.message
