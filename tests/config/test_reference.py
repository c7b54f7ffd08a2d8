"""docs/configuration.md is generated from the models and kept up to date."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from pgproxy.config import models
from pgproxy.config.reference import REGENERATE_COMMAND, render_reference
from pgproxy.config.units import format_size

DOC = Path(__file__).parents[2] / "docs" / "configuration.md"


def test_reference_is_up_to_date() -> None:
    assert DOC.read_text(encoding="utf-8") == render_reference(), (
        f"docs/configuration.md is out of date; regenerate it: {REGENERATE_COMMAND}"
    )


def config_models() -> list[type[BaseModel]]:
    return [
        value
        for value in vars(models).values()
        if isinstance(value, type)
        and issubclass(value, BaseModel)
        and value.__module__ == models.__name__
        and not value.__name__.startswith("_")
    ]


@pytest.mark.parametrize("model", config_models(), ids=lambda model: model.__name__)
def test_every_key_is_documented(model: type[BaseModel]) -> None:
    reference = render_reference()
    if model is models.Config:
        sections = ["## `[server]`", "## `[listeners.NAME]`", "## `[[routes]]`"]
        assert all(section in reference for section in sections)
        return
    assert (model.__doc__ or "").strip() in reference
    for name, field in model.model_fields.items():
        assert f"| `{name}` |" in reference
        assert field.description, f"{model.__name__}.{name} has no description"


def test_reference_shows_user_units() -> None:
    reference = render_reference()

    assert '| `max_header_bytes` | size, 1KiB-1MiB | `"64KiB"` |' in reference
    assert '| `drain_timeout` | duration | `"30s"` |' in reference
    assert "| `address` | string | required |" in reference


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (65536, "64KiB"),
        (100 * 2**20, "100MiB"),
        (2**30, "1GiB"),
        (1000, "1000B"),
        (0, "0B"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text
