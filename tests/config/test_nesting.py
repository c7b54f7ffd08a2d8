"""Nesting depth of arrays and inline tables, measured before parsing."""

from __future__ import annotations

import pytest

from pgproxy.config.nesting import Nesting, measure_nesting


def test_flat_text_has_depth_zero() -> None:
    assert measure_nesting('a = 1\nb = "x"\n') == Nesting(0, 0)


def test_deepest_value_and_its_offset() -> None:
    text = "a = [1]\nb = [[2], {c = [3]}]\n"

    nesting = measure_nesting(text)

    assert nesting.depth == 3
    assert nesting.offset == text.index("[[")


def test_deep_value_found_without_recursion() -> None:
    text = "junk = " + "[" * 5000 + "]" * 5000

    assert measure_nesting(text) == Nesting(5000, 7)


def test_table_headers_count_at_most_two() -> None:
    assert measure_nesting("[a]\nx = 1\n[[b]]\ny = 2\n").depth == 2


@pytest.mark.parametrize(
    "text",
    [
        'a = "[[[[{{{{"',
        "a = '[[[[{{{{'",
        'a = """\n[[[[\n{{{{ \\""" [[["""',
        "a = '''\n[[[[\n{{{{'''",
        "# [[[[{{{{\na = 1",
        'a = "\\"[[[[" # [[[[',
    ],
    ids=[
        "basic",
        "literal",
        "multi-line-basic",
        "multi-line-literal",
        "comment",
        "escape",
    ],
)
def test_brackets_in_strings_and_comments_ignored(text: str) -> None:
    assert measure_nesting(text).depth == 0


def test_unterminated_string_ends_at_line_end() -> None:
    assert measure_nesting('a = "[[\nb = [[1]]\n').depth == 2


def test_unterminated_multi_line_string_runs_to_end() -> None:
    assert measure_nesting('a = """ [[[\nb = [[1]]\n').depth == 0


def test_extra_closing_brackets_do_not_go_negative() -> None:
    assert measure_nesting("a = ]]]]\nb = [[1]]\n").depth == 2
