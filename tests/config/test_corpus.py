"""Every broken config under corpus/ reports exactly the diagnostics it lists.

Each corpus file starts with a comment saying what is wrong, then one
`# expect: LINE:COLUMN | KEY | CODE | SEVERITY` line per diagnostic that
`pgproxy validate --format json` must report, in output order (KEY is "-"
for a diagnostic about the file rather than a key).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pgproxy.cli.app import app

CORPUS = Path(__file__).parent / "corpus"
CASES = sorted(CORPUS.glob("*.toml"))


def expected_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        line.removeprefix("# expect: ")
        for line in lines
        if line.startswith("# expect: ")
    ]


def reported_lines(document: dict[str, object]) -> list[str]:
    diagnostics = document["diagnostics"]
    assert isinstance(diagnostics, list)
    return [
        f"{d['line']}:{d['column']} | {d['key'] or '-'} | {d['code']} | {d['severity']}"
        for d in diagnostics
    ]


def test_corpus_size() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("path", CASES, ids=[path.stem for path in CASES])
def test_corpus_case(path: Path) -> None:
    expected = expected_lines(path)
    assert expected, f"{path.name} lists no expected diagnostic"

    result = CliRunner().invoke(app, ["validate", "--format", "json", str(path)])

    document = json.loads(result.stdout)
    assert reported_lines(document) == expected
    has_error = any(line.endswith("| error") for line in expected)
    assert result.exit_code == (1 if has_error else 0)
    assert document["valid"] is not has_error


@pytest.mark.parametrize("strict", [False, True])
def test_corpus_warning_only_case_with_strict(strict: bool) -> None:
    path = CORPUS / "semantic-shadowed-route.toml"
    args = ["validate", "--format", "json", str(path)]
    result = CliRunner().invoke(app, [*args, "--strict"] if strict else args)

    assert result.exit_code == (1 if strict else 0)
    assert json.loads(result.stdout)["valid"] is not strict


@pytest.mark.parametrize(
    "name",
    [
        "syntax-two-errors",
        "many-problems",
        "unknown-key-inline-endpoint",
        "semantic-unknown-cluster",
    ],
)
def test_corpus_case_in_subprocess(name: str) -> None:
    path = CORPUS / f"{name}.toml"

    completed = subprocess.run(
        [sys.executable, "-m", "pgproxy", "validate", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 1
    assert completed.stderr == ""
    assert reported_lines(json.loads(completed.stdout)) == expected_lines(path)
