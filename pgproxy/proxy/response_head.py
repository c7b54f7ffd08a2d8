"""A one-pass reader for the usual upstream response head.

Most responses to a proxied request arrive with their whole head in the
first read: HTTP/1.1, a final status, well-formed fields and a
Content-Length (or no body at all). `read_response_head` reads such a head
straight from the bytes and keeps the runs of header lines that are
forwarded unchanged. The head sent downstream is then a join of a few
slices instead of one rebuilt line per field, and llhttp makes no callback
for it.

Invariant: the reader returns None for every head it does not fully
understand, and llhttp then parses that head as before. Any doubt means
None. That covers:
- a head split over reads or larger than the limit;
- a version other than HTTP/1.1, and a status outside 200-599: 1xx, 101,
  and the invalid codes that framing.check_response_head rejects;
- no Content-Length where the body would run to the connection's end,
  and a Content-Length in a 204, which the proxy drops;
- Transfer-Encoding, Proxy-Connection, two Content-Length or two
  Connection fields, and a Connection option other than keep-alive, close
  or upgrade;
- a name that is not a token, which also catches obs-fold and whitespace
  before the colon;
- any control byte, and a bare CR or LF.
What the reader accepts, llhttp accepts too, with the same status, fields
and framing (tests/proxy/test_response_head.py compares the two).

The same reader is written in C (pgproxy/proxy/_response_head.c) and is used
when it is built, with the compiled modules. `read_response_head_python` is
the reference for it and the fallback. tests/proxy/test_response_head_c.py
checks that both readers return the same for a seeded corpus of mutated heads.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from pgproxy import compiled
from pgproxy.proxy.framing import (
    COMMON_CONNECTION_TOKENS,
    TOKEN_RE,
    ResponseInfo,
    byte_map,
)

# The result of the C reader's read_head for a head it reads: status,
# Content-Length or None, Connection options or None, unchanged lines, Via
# values or None, body, body length.
CResult = tuple[
    int,
    int | None,
    frozenset[bytes] | None,
    list[bytes],
    list[bytes] | None,
    bytes,
    int,
]
CReadHead = Callable[[bytes, int, bool, dict[bytes, frozenset[bytes]]], CResult | None]

_VERSION: Final = b"HTTP/1.1 "
_END: Final = b"\r\n\r\n"
# bytes methods that mypyc has no primitive for, as plain functions. Compiled
# code calls `data.partition(...)` by name, with a type lookup each time, but
# calls a function held in a Final directly.
_partition: Final = bytes.partition
_splitlines: Final = bytes.splitlines
# Changes every byte but those a status line or field line may hold (HTAB,
# SP, VCHAR and obs-text, RFC 9110 section 5.5) and the CR and LF that end
# lines.
_HEAD_MAP: Final = byte_map(lambda byte: byte in b"\t\r\n" or 0x20 <= byte != 0x7F)
# The Via values of a head that has none; never appended to.
_NO_VIA: Final[list[bytes]] = []

# Field kinds: how the proxy treats a field, by its name.
_PLAIN: Final = 0  # forwarded as received
_LENGTH: Final = 1  # Content-Length: forwarded, and it frames the body
_CONNECTION: Final = 2  # read for its options, not forwarded
_DROPPED: Final = 3  # another hop-by-hop field (RFC 9110 section 7.6.1)
_VIA: Final = 4  # joined into the proxy's own Via
_UNREAD: Final = 5  # this reader gives the head to llhttp
_KIND_BY_LOWER_NAME: Final = {
    b"content-length": _LENGTH,
    b"connection": _CONNECTION,
    b"keep-alive": _DROPPED,
    b"te": _DROPPED,
    b"trailer": _DROPPED,
    b"upgrade": _DROPPED,
    b"via": _VIA,
    b"transfer-encoding": _UNREAD,
    # llhttp reads Proxy-Connection as Connection, so it decides whether
    # the connection stays open (pgproxy/proxy/upstream.py).
    b"proxy-connection": _UNREAD,
    # `Connection: close` would also drop a field named "close". The other
    # Connection options read here (framing.COMMON_CONNECTION_TOKENS) name
    # fields that are dropped anyway.
    b"close": _UNREAD,
}
# Kinds by name as received. Upstreams send the same few names, and a dict
# hit replaces the token check and lower-casing. Bounded: names up to 64
# bytes, emptied when 1,024 are held.
_KINDS: Final[dict[bytes, int]] = {}
_MAX_CACHED_NAME: Final = 64
_MAX_CACHED_NAMES: Final = 1024


class FieldLayout:
    """The field names of the last head read from one endpoint, in order.

    An upstream sends the same names in the same order in each response.
    A line that starts with the name recorded at its place, colon included,
    is classified by one startswith(), without splitting the line or
    hashing its name. A line that does not match updates the place. At
    most `MAX_PLACES` places are kept.
    """

    __slots__ = ("kinds", "prefixes")

    MAX_PLACES: Final = 64

    def __init__(self) -> None:
        self.prefixes: list[bytes] = []
        self.kinds: list[int] = []

    def __repr__(self) -> str:
        return f"<FieldLayout places={len(self.prefixes)}>"


class ResponseHead:
    """A response head read by `read_response_head`.

    `unchanged_lines` contains the status line and the header lines
    forwarded as received, as a few slices of the read, each ending in
    CRLF. `via` contains the values of Via fields, which the proxy joins
    into its own. `body` is the rest of the read after the head, and
    `body_length` the number of body bytes to relay, in this read and
    later ones.
    """

    __slots__ = ("body", "body_length", "info", "status", "unchanged_lines", "via")

    def __init__(
        self,
        status: int,
        info: ResponseInfo,
        unchanged_lines: list[bytes],
        via: list[bytes],
        body: bytes,
        body_length: int,
    ) -> None:
        self.status = status
        self.info = info
        self.unchanged_lines = unchanged_lines
        self.via = via
        self.body = body
        self.body_length = body_length

    def __repr__(self) -> str:
        return (
            f"<ResponseHead {self.status} body={self.info.body} "
            f"length={self.body_length}>"
        )


def _load_c_reader() -> CReadHead | None:
    """Import the C reader if pgproxy/compiled.py chose it for this process."""
    if compiled.C_RESPONSE_HEAD not in compiled.C_MODULES_USED:
        return None
    from pgproxy.proxy._response_head import read_head

    return read_head


# The reader in C (pgproxy/proxy/_response_head.c), or None to run the
# Python reader below.
_C_READ_HEAD: Final = _load_c_reader()


def read_response_head(
    data: bytes, max_head: int, head_request: bool, layout: FieldLayout
) -> ResponseHead | None:
    """Read the response head at the start of `data`, or return None.

    The C reader reads it when it is built and used (pgproxy/compiled.py),
    and `layout` is then left unchanged. Otherwise the Python reader does.
    Both return None for the same heads, and the same head for the others.
    """
    if _C_READ_HEAD is not None:
        return read_response_head_c(_C_READ_HEAD, data, max_head, head_request)
    return read_response_head_python(data, max_head, head_request, layout)


def read_response_head_c(
    read_head: CReadHead, data: bytes, max_head: int, head_request: bool
) -> ResponseHead | None:
    """Read the response head at the start of `data` with the C `read_head`.

    The other arguments and the result are those of read_response_head.
    """
    found = read_head(data, max_head, head_request, COMMON_CONNECTION_TOKENS)
    if found is None:
        return None
    status, length, options, unchanged_lines, via, body, body_length = found
    info = ResponseInfo()
    if options is not None:
        info.connection_tokens = options
        info.keep_alive = b"close" not in options
    info.content_length = length
    # The C reader returns a body length of 0 for HEAD, 204, 304 and a zero
    # Content-Length, and the body is then "none".
    if body_length:
        info.body = "length"
    if via is None:
        via = _NO_VIA
    return ResponseHead(status, info, unchanged_lines, via, body, body_length)


def read_response_head_python(
    data: bytes, max_head: int, head_request: bool, layout: FieldLayout
) -> ResponseHead | None:
    """Read the response head at the start of `data`, or return None.

    `max_head` bounds the bytes of the head, its final CRLF CRLF included;
    `head_request` means the request was HEAD, so no body follows.
    `layout` contains the names of the endpoint's last head and is updated.
    """
    # Only bytes methods with fast argument passing are used: bytes.find and
    # bytes.count parse their arguments as a tuple, about 800 instructions a
    # call (callgrind, CPython 3.11.7).
    if not data.startswith(_VERSION):
        return None
    block, end, body = _partition(data, _END)
    if not end or len(block) + 4 > max_head:
        return None
    # translate() with only a table is the fast form. CR and LF pass it, and
    # splitlines() breaks at each. The line offsets summed below add up to
    # the block's length only if every break was a CRLF, so a bare CR or LF
    # sends the head to llhttp. splitlines() drops a break at the very end,
    # so the block must not end with CR or LF.
    if block.translate(_HEAD_MAP) != block:
        return None
    last = block[len(block) - 1]
    if last == 0x0D or last == 0x0A:
        return None
    lines = _splitlines(block)
    status = _read_status(lines[0])
    if status < 200 or status > 599:
        return None

    unchanged_lines: list[bytes] = []
    via = _NO_VIA
    length = -1
    options: frozenset[bytes] | None = None
    run_start = 0
    pos = len(lines[0]) + 2
    prefixes = layout.prefixes
    kinds = layout.kinds
    for i in range(1, len(lines)):
        line = lines[i]
        line_end = pos + len(line) + 2
        place = i - 1
        if place < len(prefixes) and line.startswith(prefixes[place]):
            kind = kinds[place]
            value_at = len(prefixes[place])
        else:
            name, colon, _ = line.partition(b":")
            if not colon or not name:
                return None
            found = _KINDS.get(name)
            kind = _new_kind(name) if found is None else found
            if kind == _UNREAD:
                return None
            value_at = len(name) + 1
            if place < len(prefixes):
                prefixes[place] = line[:value_at]
                kinds[place] = kind
            elif place < FieldLayout.MAX_PLACES:
                prefixes.append(line[:value_at])
                kinds.append(kind)
        if kind == _PLAIN:
            pos = line_end
            continue
        # The value without the optional whitespace around it (RFC 9112
        # section 5), found by offsets: a slice and a strip would be two copies.
        start = value_at
        stop = len(line)
        while start < stop and (line[start] == 0x20 or line[start] == 0x09):
            start += 1
        while stop > start and (line[stop - 1] == 0x20 or line[stop - 1] == 0x09):
            stop -= 1
        if kind == _LENGTH:
            if length >= 0:
                return None
            length = _read_length(line, start, stop)
            if length < 0:
                return None
            pos = line_end
            continue
        value = line[start:stop]
        if kind == _CONNECTION:
            if options is not None:
                return None
            options = COMMON_CONNECTION_TOKENS.get(value)
            if options is None:
                return None
        elif kind == _VIA:
            if via is _NO_VIA:
                via = []
            via.append(value)
        # The field is not forwarded: close the run of unchanged lines before it.
        if run_start < pos:
            unchanged_lines.append(data[run_start:pos])
        run_start = pos = line_end
    if pos != len(block) + 2:
        return None  # a line ended with a bare CR or LF
    if run_start < pos:
        unchanged_lines.append(data[run_start:pos])

    info = ResponseInfo()
    if options is not None:
        info.connection_tokens = options
        info.keep_alive = b"close" not in options
    info.content_length = length if length >= 0 else None
    if status == 204 and length >= 0:
        return None  # llhttp reads it, and build_response_head drops the length
    if head_request or status == 204 or status == 304:
        body_length = 0
    elif length < 0:
        # No length: the body runs until the upstream closes (llhttp reads it).
        return None
    else:
        body_length = length
        info.body = "length" if length else "none"
    return ResponseHead(status, info, unchanged_lines, via, body, body_length)


def _read_status(line: bytes) -> int:
    """Return the status code of `HTTP/1.1 NNN reason`, or -1."""
    # The caller checked the version. SP after the code is required (RFC
    # 9112 section 4); the reason may be empty. Digits are read one by one:
    # int(bytes) costs several times as much.
    if len(line) < 13 or line[12] != 0x20:
        return -1
    code = 0
    for i in range(9, 12):
        digit = line[i] - 0x30
        if digit < 0 or digit > 9:
            return -1
        code = code * 10 + digit
    return code


def _read_length(line: bytes, start: int, stop: int) -> int:
    """Return the Content-Length of 1 to 18 digits in `line[start:stop]`, or -1."""
    if stop <= start or stop - start > 18:
        return -1
    length = 0
    for i in range(start, stop):
        digit = line[i] - 0x30
        if digit < 0 or digit > 9:
            return -1
        length = length * 10 + digit
    return length


def _new_kind(name: bytes) -> int:
    """Return what the proxy does with a field called `name`, and cache it."""
    if TOKEN_RE.match(name) is None:
        return _UNREAD
    kind = _KIND_BY_LOWER_NAME.get(name.lower(), _PLAIN)
    if len(name) <= _MAX_CACHED_NAME:
        if len(_KINDS) >= _MAX_CACHED_NAMES:
            _KINDS.clear()
        _KINDS[name] = kind
    return kind
