"""Typed durations and sizes for config fields.

Durations are written with a unit (`"250ms"`, `"5s"`, `"2m"`, `"1h"`) and
held as float seconds; sizes are written as bytes or with a binary unit
(`"64KiB"`, `"10MiB"`) and held as int bytes. The JSON Schema of both types
describes the string form that users write.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
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

DURATION_PATTERN = r"^\d+(\.\d+)?(ms|s|m|h)$"
SIZE_PATTERN = r"^\d+(B|KiB|MiB|GiB|KB|MB|GB)?$"


def parse_duration(value: Any) -> float:
    """Convert `"250ms"`, `"5s"`, `"2m"` or `"1h"` to float seconds.

    Raises ValueError for bare numbers, because `timeout = 5` is ambiguous
    between seconds and milliseconds in other proxies' configs.
    """
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(
            f"invalid duration {value!r}: write a string with a unit, "
            'such as "250ms", "5s", "2m" or "1h"'
        )
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError(
            f'invalid duration "{value}": expected a number and a unit '
            '(ms, s, m, h), such as "250ms" or "5s"'
        )
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


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


def parse_size(value: Any) -> int:
    """Convert an int of bytes, or `"64KiB"`, `"10MiB"`, `"1GB"`, to int bytes."""
    if isinstance(value, bool):
        raise ValueError(
            f"invalid size {value!r}: expected bytes or a string like 64KiB"
        )
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value}: must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"invalid size {value!r}: expected bytes or a string like 64KiB"
        )
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(
            f'invalid size "{value}": expected bytes or a number with a unit '
            '(B, KiB, MiB, GiB, KB, MB, GB), such as "64KiB"'
        )
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


DurationSeconds = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN}),
]
"""A duration written with a unit in the config, held as float seconds."""

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
