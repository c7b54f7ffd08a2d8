"""A route's header rules, applied to a complete head on its way out.

Rules come from `request_headers` and `response_headers` of a route. A head
built by pgproxy is rewritten once more: the fields that a rule removes or
sets are dropped, then the set and added fields are written before the
empty line. Only routes with rules pay for this, and a head of such a route
is split into lines once.

Invariant: the head passed in is one that pgproxy built, so it consists of
lines ending in CRLF, every field line is `name: value` with a token name,
and the last line is empty. The rules never touch the framing, Connection,
Via, Host or X-Forwarded-* fields (the config rejects rules naming them),
so the framing that the proxy chose stays as it is.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

from pgproxy.graph.settings import HeaderRulesSettings

_CRLF: Final = b"\r\n"
# Called through a Final: compiled code looks `line.partition` up by name.
_partition: Final = bytes.partition


class HeaderRules:
    """Header rules ready to apply: names to drop and the lines to write."""

    __slots__ = ("drop", "extra")

    def __init__(self, settings: HeaderRulesSettings) -> None:
        names = [*settings.remove, *(name for name, _ in settings.set)]
        self.drop = frozenset(name.lower().encode("ascii") for name in names)
        fields = [*settings.set, *settings.add]
        self.extra = b"".join(f"{name}: {value}\r\n".encode() for name, value in fields)

    def __repr__(self) -> str:
        return f"<HeaderRules drop={len(self.drop)} extra={len(self.extra)} bytes>"

    def apply(self, head: bytes) -> bytes:
        """Return `head`, which ends with CRLF CRLF, with the rules applied."""
        lines = head[: len(head) - 4].split(_CRLF)
        forwarded = [lines[0]]
        drop = self.drop
        for i in range(1, len(lines)):
            line = lines[i]
            name = _partition(line, b":")[0].lower()
            if name not in drop:
                forwarded.append(line)
        forwarded.append(self.extra)
        return _CRLF.join(forwarded) + _CRLF
