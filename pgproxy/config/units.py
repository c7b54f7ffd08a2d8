"""Typed durations and sizes for config fields.

Durations are written with a unit (`"250ms"`, `"5s"`, `"2m"`, `"1h"`) and
held as float seconds; sizes are written as bytes or with a binary unit
(`"64KiB"`, `"10MiB"`) and held as int bytes. The JSON Schema of both types
describes the string form that users write.

Every duration is at most MAX_DURATION_SECONDS (24h), which keeps timer
arithmetic far from float overflow. `DurationSeconds` accepts 0, for the few
keys where 0 has a meaning; `PositiveDurationSeconds` starts at 1ms, the
resolution at which durations are printed back.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema
from pydantic_core import PydanticCustomError

# re.ASCII: \d would also match other scripts' digits ("５s"), which float()
# accepts, and \s other Unicode spaces. \Z: $ also matches before a newline.
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*\Z", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*\Z", re.ASCII)
_MAX_SIZE_DIGITS = 18
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}

DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)\s*$"
# The error type that the config loader reports as "invalid type: expected
# <message>, got <the TOML value>".
SHAPE_ERROR = "pgproxy_shape"
MAX_DURATION_SECONDS = 24 * 3600.0
MIN_POSITIVE_DURATION_SECONDS = 0.001
SIZE_PATTERN = r"^\s*\d+\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$"


def parse_duration(value: Any) -> float:
    """Convert `"250ms"`, `"5s"`, `"2m"` or `"1h"` to float seconds.

    Raises ValueError for an invalid string. A value that is not a string,
    even a bare number, raises PydanticCustomError, which the config loader
    reports as an invalid type in TOML terms ("got integer 5"). A number is
    rejected because `timeout = 5` is ambiguous between seconds and
    milliseconds in other proxies' configs.
    """
    if not isinstance(value, str):
        raise PydanticCustomError(
            SHAPE_ERROR,
            'expected a string with a unit, such as "250ms", "5s", "2m" or "1h"',
        )
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError(
            f'invalid duration "{value}": expected a number and a unit '
            '(ms, s, m, h), such as "250ms" or "5s"'
        )
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f'invalid duration "{_shorten(value)}": must be at most 24h')
    return seconds


def parse_positive_duration(value: Any) -> float:
    """Convert a duration as `parse_duration` does, rejecting anything below 1ms."""
    seconds = parse_duration(value)
    if seconds < MIN_POSITIVE_DURATION_SECONDS:
        raise ValueError(f'invalid duration "{_shorten(value)}": must be at least 1ms')
    return seconds


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_duration(seconds: float) -> str:
    """Format float seconds back to the shortest exact string form."""
    millis = round(seconds * 1000)
    if millis % 3_600_000 == 0 and millis:
        return f"{millis // 3_600_000}h"
    if millis % 60_000 == 0 and millis:
        return f"{millis // 60_000}m"
    if millis % 1000 == 0:
        return f"{millis // 1000}s"
    return f"{millis}ms"


def format_size(size: int) -> str:
    """Write bytes with the largest binary unit that divides them exactly."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_size(value: Any) -> int:
    """Convert an int of bytes, or `"64KiB"`, `"10MiB"`, `"1GB"`, to int bytes.

    Raises ValueError for an invalid size, and PydanticCustomError for a
    value of another type, as `parse_duration` does.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"invalid size {value}: must not be negative")
        return value
    if not isinstance(value, str):
        raise PydanticCustomError(
            SHAPE_ERROR, 'expected an integer of bytes or a string such as "64KiB"'
        )
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(
            f'invalid size "{_shorten(value)}": expected bytes or a number with a '
            'unit (B, KiB, MiB, GiB, KB, MB, GB), such as "64KiB"'
        )
    # int() raises above 4,300 digits, with advice about a Python setting that
    # means nothing to a user. 18 digits (an exabyte) are enough for any size.
    if len(match.group(1)) > _MAX_SIZE_DIGITS:
        raise ValueError(
            f'invalid size "{_shorten(value)}": too large, at most 18 digits'
        )
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


DurationSeconds = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN}),
]
"""A duration from 0 to 24h written with a unit, held as float seconds."""

PositiveDurationSeconds = Annotated[
    float,
    BeforeValidator(parse_positive_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN}),
]
"""A duration from 1ms to 24h written with a unit, held as float seconds."""

SizeBytes = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": SIZE_PATTERN},
            ]
        }
    ),
]
"""A size written as bytes or with a unit in the config, held as int bytes."""


def size_in_range(low: int, high: int) -> Callable[[Any], int]:
    """Return a parser like `parse_size` that accepts only `low` to `high` bytes."""

    def parse(value: Any) -> int:
        size = parse_size(value)
        if not low <= size <= high:
            written = f'"{_shorten(value)}"' if isinstance(value, str) else str(value)
            raise ValueError(
                f"invalid size {written}: must be {format_size(low)} to "
                f"{format_size(high)}"
            )
        return size

    return parse


# Header block limits. A browser request with a few cookies can exceed 1KiB,
# so a smaller limit only breaks clients. Above 1MiB, each connection could
# buffer that much before a byte is forwarded. (Envoy's default
# max_request_headers_kb is 60.)
MIN_HEADER_BYTES = 1024
MAX_HEADER_BYTES = 1024 * 1024

HeaderSizeBytes = Annotated[
    int,
    BeforeValidator(size_in_range(MIN_HEADER_BYTES, MAX_HEADER_BYTES)),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "integer",
                    "minimum": MIN_HEADER_BYTES,
                    "maximum": MAX_HEADER_BYTES,
                },
                {"type": "string", "pattern": SIZE_PATTERN},
            ]
        }
    ),
]
"""A header block size from 1KiB to 1MiB, written like SizeBytes."""
