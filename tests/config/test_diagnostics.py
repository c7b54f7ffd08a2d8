"""The one-line rendering of a Diagnostic."""

from __future__ import annotations

from pgproxy.config.diagnostics import Diagnostic


def test_render_full_position() -> None:
    diagnostic = Diagnostic(
        "a.toml", 3, 7, "listeners.x", "unknown-key", "bad", hint="fix"
    )

    assert diagnostic.render() == "a.toml:3:7: listeners.x: bad (fix)"


def test_render_omits_unknown_position() -> None:
    diagnostic = Diagnostic("dir.toml", 0, 0, "", "file-unreadable", "is a directory")

    assert diagnostic.render() == "dir.toml: is a directory"


def test_render_omits_unknown_column() -> None:
    diagnostic = Diagnostic("a.toml", 4, 0, "", "toml-syntax", "bad")

    assert diagnostic.render() == "a.toml:4: bad"
