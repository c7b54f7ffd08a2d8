"""`pgproxy validate`: output formats, exit codes, bad input, offline checks."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from pgproxy.cli.app import app
from pgproxy.cli.validate_formats import SARIF_SCHEMA

VALID = """\
[listeners.public]
address = "127.0.0.1:8080"

[[routes]]
cluster = "api"

[clusters.api]
endpoints = ["app.internal.example:9000"]
"""

INVALID = """\
[listeners.public]
adress = "127.0.0.1:8080"

[clusters.api]
endpoints = ["10.0.0.1"]
"""

# Valid, with one warning: two endpoints and no health check.
WARNING = """\
[listeners.public]
address = "127.0.0.1:8080"

[[routes]]
cluster = "api"

[clusters.api]
endpoints = ["10.0.0.1:80", "10.0.0.2:80"]
"""

ANSI = re.compile(r"\x1b\[")


def write(directory: Path, name: str, data: str | bytes) -> Path:
    path = directory / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(app, ["validate", *args], env=env)
    # typer.Exit surfaces as SystemExit; anything else is a crash.
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception
    )
    assert "Traceback" not in result.output
    return result


def test_valid_file(tmp_path: Path) -> None:
    result = run(str(write(tmp_path, "ok.toml", VALID)))

    assert result.exit_code == 0
    assert result.stdout == "1 file checked: 0 errors, 0 warnings\n"


def test_text_output_shows_line_and_caret(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.toml", INVALID)

    result = run(str(path))

    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        f'{path}:2:1: listeners.public.adress: unknown key "adress" [unknown-key]',
        '  2 | adress = "127.0.0.1:8080"',
        "    | ^",
        '  hint: did you mean "address"?',
    ]
    assert lines[4] == (
        f'{path}:5:14: clusters.api.endpoints[0]: invalid address "10.0.0.1": '
        'expected "host:port" or "[v6]:port" [invalid-value]'
    )
    assert lines[5:7] == ['  5 | endpoints = ["10.0.0.1"]', "    |              ^"]
    assert lines[-1] == "1 file checked: 2 errors, 0 warnings"
    assert not ANSI.search(result.stdout)


def test_caret_follows_tabs(tmp_path: Path) -> None:
    path = write(tmp_path, "tabs.toml", '[listeners.a]\n\taddress =\t"x"\n')

    lines = run(str(path)).stdout.splitlines()

    assert lines[1] == '  2 |     address =   "x"'
    assert lines[2] == "    |                 ^"


def test_colors_when_forced(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.toml", INVALID)

    result = run(str(path), env={"FORCE_COLOR": "1", "NO_COLOR": ""})

    assert ANSI.search(result.stdout)


def test_warning_passes_unless_strict(tmp_path: Path) -> None:
    path = write(tmp_path, "warn.toml", WARNING)

    relaxed = run(str(path))
    strict = run("--strict", str(path))

    assert relaxed.exit_code == 0
    assert f"{path}:7:1: clusters.api: warning: cluster api has 2" in relaxed.stdout
    assert relaxed.stdout.endswith("1 file checked: 0 errors, 1 warning\n")
    assert strict.exit_code == 1
    assert strict.stdout.endswith("0 errors, 1 warning (--strict: warnings fail)\n")


def test_several_files(tmp_path: Path) -> None:
    good = write(tmp_path, "good.toml", VALID)
    bad = write(tmp_path, "bad.toml", INVALID)

    result = run(str(good), str(bad))

    assert result.exit_code == 1
    assert result.stdout.endswith("2 files checked: 2 errors, 0 warnings\n")


def test_unreadable_file_wins_exit_code(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.toml", INVALID)

    result = run(str(bad), str(tmp_path / "absent.toml"))

    assert result.exit_code == 2
    assert (
        f"{tmp_path / 'absent.toml'}: file not found [file-unreadable]" in result.stdout
    )


def test_no_config_is_a_usage_error() -> None:
    result = CliRunner().invoke(app, ["validate"])

    assert result.exit_code == 2


def test_unknown_format_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", "--format", "xml", "x.toml"])

    assert result.exit_code == 2


def test_json_shape(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.toml", INVALID)
    warn = write(tmp_path, "warn.toml", WARNING)

    result = run("--format", "json", str(bad), str(warn))

    document = json.loads(result.stdout)
    assert result.exit_code == 1
    assert document["version"] == 1
    assert document["valid"] is False
    assert document["strict"] is False
    assert document["summary"] == {"files": 2, "errors": 2, "warnings": 1}
    assert document["files"] == [
        {"file": str(bad), "valid": False, "errors": 2, "warnings": 0},
        {"file": str(warn), "valid": True, "errors": 0, "warnings": 1},
    ]
    assert document["diagnostics"][0] == {
        "file": str(bad),
        "line": 2,
        "column": 1,
        "key": "listeners.public.adress",
        "code": "unknown-key",
        "severity": "error",
        "message": 'unknown key "adress"',
        "hint": 'did you mean "address"?',
        "source_line": 'adress = "127.0.0.1:8080"',
    }
    assert document["diagnostics"][2]["severity"] == "warning"


def test_github_annotations(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.toml", INVALID)
    warn = write(tmp_path, "warn.toml", WARNING)

    result = run("--format", "github", str(bad), str(warn))

    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"::error file={bad},line=2,col=1,title=listeners.public.adress::"
        'unknown key "adress" [unknown-key]%0Ahint: did you mean "address"?'
    )
    assert lines[2].startswith(
        f"::warning file={warn},line=7,col=1,title=clusters.api::"
    )
    assert lines[-1] == "2 files checked: 2 errors, 1 warning"


def test_github_escaping(tmp_path: Path) -> None:
    directory = tmp_path / "a,b:c%"
    directory.mkdir()
    path = write(directory, "x.toml", '[listeners.a]\naddress = "host:100%"\n')

    line = run("--format", "github", str(path)).stdout.splitlines()[0]

    escaped = str(path).replace("%", "%25").replace(":", "%3A").replace(",", "%2C")
    assert line.startswith(
        f"::error file={escaped},line=2,col=11,title=listeners.a.address::"
    )
    assert 'invalid port "100%25" in "host:100%25"' in line


def test_github_file_level_annotation(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.toml", "")

    line = run("--format", "github", str(path)).stdout.splitlines()[0]

    assert (
        line == f"::error file={path},title=file-empty::the file is empty [file-empty]"
    )


def test_sarif_log(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad file.toml", INVALID)
    empty = write(tmp_path, "empty.toml", "")

    result = run("--format", "sarif", str(bad), str(empty))

    log = json.loads(result.stdout)
    assert result.exit_code == 1
    assert log["$schema"] == SARIF_SCHEMA
    assert log["version"] == "2.1.0"
    [sarif_run] = log["runs"]
    driver = sarif_run["tool"]["driver"]
    assert driver["name"] == "pgproxy"
    rule_ids = [rule["id"] for rule in driver["rules"]]
    assert rule_ids == ["file-empty", "invalid-value", "unknown-key"]
    first, second, third = sarif_run["results"]
    assert first["ruleId"] == "unknown-key"
    assert rule_ids[first["ruleIndex"]] == "unknown-key"
    assert first["level"] == "error"
    assert first["message"]["text"].startswith("listeners.public.adress: unknown key")
    location = first["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == bad.as_uri()
    assert location["region"] == {"startLine": 2, "startColumn": 1}
    assert second["ruleId"] == "invalid-value"
    assert "region" not in third["locations"][0]["physicalLocation"]


def test_sarif_relative_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf d").mkdir()
    write(tmp_path / "conf d", "bad.toml", INVALID)

    log = json.loads(run("--format", "sarif", "conf d/bad.toml").stdout)

    location = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"] == "conf%20d/bad.toml"


def test_validate_is_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "ok.toml", VALID)

    def fail_on_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("validate touched the network")

    monkeypatch.setattr(socket, "getaddrinfo", fail_on_network)
    monkeypatch.setattr(socket, "create_connection", fail_on_network)
    monkeypatch.setattr(socket.socket, "connect", fail_on_network)

    assert run(str(path)).exit_code == 0


@pytest.mark.parametrize(
    ("name", "data", "exit_code", "code"),
    [
        ("empty.toml", b"", 1, "file-empty"),
        ("latin1.toml", "a = 'é'\n".encode("latin-1"), 1, "file-encoding"),
        ("garbage.toml", random.Random(3).randbytes(2048) + b"\0", 1, "file-binary"),
        (
            "wrong-types.toml",
            b'[listeners]\npublic = "0.0.0.0:80"\n',
            1,
            "invalid-type",
        ),
    ],
)
def test_bad_input(
    tmp_path: Path, name: str, data: bytes, exit_code: int, code: str
) -> None:
    path = write(tmp_path, name, data)

    result = run("--format", "json", str(path))

    assert result.exit_code == exit_code
    assert [d["code"] for d in json.loads(result.stdout)["diagnostics"]] == [code]


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "locked.toml", VALID)
    real_open = os.open

    def deny(file: str, *args: int, **kwargs: int) -> int:
        if Path(file).name == "locked.toml":
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    # Tests may run as root, which chmod cannot lock out.
    monkeypatch.setattr(os, "open", deny)
    result = run(str(path))

    assert result.exit_code == 2
    assert "cannot read the file: Permission denied [file-unreadable]" in result.stdout


def test_bad_input_in_subprocess(tmp_path: Path) -> None:
    huge = tmp_path / "huge.toml"
    with huge.open("wb") as stream:
        stream.truncate(50 * 1024 * 1024)  # sparse: 50 MB of NUL bytes
    directory = tmp_path / "configs"
    directory.mkdir()

    completed = subprocess.run(
        [sys.executable, "-m", "pgproxy", "validate", str(huge), str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 2
    assert completed.stderr == ""
    assert completed.stdout.splitlines() == [
        f"{huge}: the file is larger than 10 MiB [file-too-large]",
        "  hint: a pgproxy config is a few hundred KiB at most; check the path",
        f"{directory}: is a directory, not a file [file-unreadable]",
        "2 files checked: 2 errors, 0 warnings",
    ]
