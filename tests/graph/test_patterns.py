"""Path regex compilation errors and the exponential-backtracking heuristic."""

from __future__ import annotations

import pytest

from pgproxy.graph.patterns import (
    backtracking_risk,
    backtracking_warning,
    compile_path_regex,
)

NESTED_REPEAT = "an unbounded repeat contains another unbounded repeat"
IDENTICAL_BRANCHES = "a repeated alternation has two identical branches"


def test_compile_returns_pattern() -> None:
    pattern = compile_path_regex(r"^/v(\d+)/")

    assert pattern.search("/v2/x") is not None


@pytest.mark.parametrize(
    ("regex", "reason"),
    [
        ("([a-", "unterminated character set at position 1"),
        ("(a|" * 500 + "a" + ")" * 500, "groups are nested too deeply to compile"),
        ("a{99999999999999999}", "the repetition number is too large"),
    ],
    ids=["syntax", "nested-groups", "repeat-count"],
)
def test_compile_failures_become_value_errors(regex: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        compile_path_regex(regex)

    message = str(caught.value)
    assert message.startswith('invalid regular expression "')
    assert message.endswith(reason)
    assert len(message) < 200


@pytest.mark.parametrize(
    ("regex", "reason"),
    [
        (r"(a+)+", NESTED_REPEAT),
        (r"(a*)*", NESTED_REPEAT),
        (r"^/(a+)*$", NESTED_REPEAT),
        (r"^/(\w+\s?)+$", NESTED_REPEAT),
        (r"^/(?:x+y?)+$", NESTED_REPEAT),
        (r"^/((a+))+$", NESTED_REPEAT),
        (r"^/(a+)+?$", NESTED_REPEAT),
        (r"^/x(?=(a+)+)", NESTED_REPEAT),
        (r"^/(?:[a-z]+|x)(b+)+", NESTED_REPEAT),
        (r"(a|a)*", IDENTICAL_BRANCHES),
        (r"^/(?:ab|ab)+$", IDENTICAL_BRANCHES),
    ],
)
def test_backtracking_flagged(regex: str, reason: str) -> None:
    assert backtracking_risk(regex) == reason


@pytest.mark.parametrize(
    "regex",
    [
        r"^/api/v\d+/users/(\d+)$",
        r"^/static/.*\.(css|js)$",
        r"^/[^/]+(/[^/]+)*$",
        r"(/[a-z]+)*",
        r"^/(a|b)+$",
        r"(ab|cd)*",
        r"(a|ab)*",
        r"(a+){3}",
        r"(a+)++",
        r"(?>a+)+",
        r"(a++)+",
    ],
    ids=[
        "anchored-ids",
        "static-files",
        "segments",
        "separated-repeat",
        "distinct-branches",
        "distinct-pairs",
        "shared-prefix",
        "bounded-outer",
        "possessive-outer",
        "atomic-group",
        "possessive-inner",
    ],
)
def test_safe_regexes_not_flagged(regex: str) -> None:
    assert backtracking_risk(regex) is None


def test_warning_names_the_regex_and_the_fix() -> None:
    warning = backtracking_warning(r"^/(a+)+$")

    assert warning is not None
    message, hint = warning
    assert message == (
        'regular expression "^/(a+)+$" may take exponential time to match: '
        + NESTED_REPEAT
    )
    assert "no backtracking limit" in hint
    assert "possessive" in hint


def test_no_warning_for_safe_regex() -> None:
    assert backtracking_warning(r"^/v\d+/") is None
