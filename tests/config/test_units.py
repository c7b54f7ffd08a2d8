"""Durations and sizes: parsing, bounds and printing back."""

from __future__ import annotations

import pytest

from pgproxy.config.units import (
    MAX_DURATION_SECONDS,
    format_duration,
    parse_duration,
    parse_positive_duration,
    parse_size,
    size_in_range,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0s", 0.0), ("250ms", 0.25), ("1.5s", 1.5), ("2m", 120.0), ("24h", 86400.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["\uff15s", "5\u00a0s", "\u0665ms"])
def test_duration_non_ascii_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["\uff11KiB", "1\u2003MiB"])
def test_size_non_ascii_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    "text", ["25h", "86401s", "1441m", "99999999999999999999999999h", "9" * 400 + "s"]
)
def test_duration_above_24h_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="must be at most 24h"):
        parse_duration(text)


def test_long_duration_shortened_in_message() -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration("9" * 400 + "s")

    assert len(str(caught.value)) < 100


@pytest.mark.parametrize("text", ["0s", "0ms", "0.5ms", "0.0001s"])
def test_positive_duration_rejects_below_1ms(text: str) -> None:
    with pytest.raises(
        ValueError, match=f'invalid duration "{text}": must be at least 1ms'
    ):
        parse_positive_duration(text)


def test_positive_duration_bounds_accepted() -> None:
    assert parse_positive_duration("1ms") == 0.001
    assert parse_positive_duration("24h") == MAX_DURATION_SECONDS


def test_format_duration_of_maximum() -> None:
    assert format_duration(MAX_DURATION_SECONDS) == "24h"


@pytest.mark.parametrize("text", ["9" * 19, "9" * 5000 + "GiB", "x" * 5000])
def test_huge_size_rejected_with_short_message(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size") as caught:
        parse_size(text)

    assert "sys.set_int_max_str_digits" not in str(caught.value)
    assert len(str(caught.value)) < 200


def test_size_of_18_digits_accepted() -> None:
    assert parse_size("9" * 18) == 10**18 - 1


@pytest.mark.parametrize(
    ("value", "size"), [(1024, 1024), ("1KiB", 1024), ("1MiB", 1 << 20)]
)
def test_size_in_range_accepts_bounds(value: object, size: int) -> None:
    assert size_in_range(1024, 1 << 20)(value) == size


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0"),
        (1023, "1023"),
        ("1025KiB", '"1025KiB"'),
        ("99999999999GiB", '"99999999999GiB"'),
    ],
)
def test_size_in_range_rejects_outside(value: object, shown: str) -> None:
    with pytest.raises(ValueError) as caught:
        size_in_range(1024, 1 << 20)(value)

    assert str(caught.value) == f"invalid size {shown}: must be 1KiB to 1MiB"
