"""The access lines a handler keeps until its next flush.

Compiled, like the access log that appends to it once per request: there
each read of `lines` or `loop` is a field access, where the same attributes
on a `logging.Handler` subclass cost a dictionary lookup each.
"""

from __future__ import annotations

import asyncio


class LineBatch:
    """Lines waiting for a flush, and the loop that flush is scheduled on."""

    __slots__ = ("lines", "loop")

    def __init__(self) -> None:
        self.lines: list[str] = []
        # The loop a flush is scheduled on, or None while none is pending.
        self.loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<LineBatch lines={len(self.lines)} scheduled={self.loop is not None}>"
