"""The request path that routes match: decoded, dot segments removed, slashes merged.

Routes match a normalised path, so `/%61dmin`, `/x/../admin`, `/./admin` and
`//admin` all meet the conditions of a route for `/admin`, as they do in
nginx's location matching. Without it, a route that responds to `/admin` with
403 could be bypassed by any of those spellings, which most upstream
frameworks resolve to `/admin` themselves.

Steps, in order:
1. Every `%XX` is decoded (RFC 3986 section 2.1), `%2F` included, and the
   bytes are read as UTF-8, so a route for `/café` matches `/caf%C3%A9`. An
   invalid escape (`%zz`, a lone `%`) or a decoded NUL makes the path
   invalid: the proxy responds with 400.
2. Dot segments are removed as in RFC 3986 section 5.2.4; `..` above the root
   stays at the root.
3. Runs of `/` become one.

Escapes are decoded once, as nginx does: a double-encoded `%2561` matches
as `%61`. The result starts with "/" whenever the input does. Paths that
contain no `%`, `/.` or `//` are returned as they are without any work,
which is nearly every request.

The upstream receives the raw path. A spelling that an upstream reads
differently from these steps therefore reaches it unseen by the route
match: `;` parameters, `\\` taken as `/`, `%2F` decoded after routing, an
escape decoded a second time, or an overlong UTF-8 sequence such as `%C0%AF`
decoded as `/`. `AmbiguousPathRule` finds the spellings that
a listener's `reject_ambiguous_paths` names in the raw path, before any
decoding, and the proxy rejects them with 400 before routing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import quote, unquote_to_bytes

_BAD_ESCAPE_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 section 3.3: pchar and "/" stay as they are when a normalised path
# is encoded again for the upstream.
_PATH_SAFE: Final = "/!$&'()*+,;=:@-._~"


# The spellings of each `reject_ambiguous_paths` name, as they appear in a raw
# path. An escape matches in either case of its hex digits.
AMBIGUOUS_SPELLINGS: dict[str, tuple[str, ...]] = {
    # Path parameters: Tomcat and Spring read `/admin;x` as `/admin`. An
    # upstream that decodes before it splits off parameters does so for
    # `%3B` too.
    "semicolon": (";", "%3B"),
    # Taken as `/` by servers that accept Windows path syntax.
    "backslash": ("\\", "%5C"),
    # Routes read `%2F` as `/`, so `/admin/x%2F..%2F..%2Fpublic` is routed as
    # `/public`. An upstream that splits the path before it decodes treats it
    # as one segment under `/admin/`.
    "escaped_slash": ("%2F",),
    # RFC 3986 section 2.4 forbids decoding twice, but an upstream that does
    # reads `%252F` as `/` and `%2561` as `a`, whatever the routes saw.
    "escaped_percent": ("%25",),
}

# Overlong UTF-8 sequences, escaped: a character encoded in more bytes than
# it needs. RFC 3629 section 3 makes them invalid, but lenient decoders read
# `%C0%AF` and `%E0%80%AF` as `/` and `%C0%AE` as `.` (IIS 4.0 and 5.0,
# MS00-078; Apache Tomcat, CVE-2008-2938). Then `/public/%C0%AE%C0%AE/admin`
# reaches `/admin`, while routes see no dot segment. The lead byte and the
# first continuation byte prove a sequence overlong, and the continuation
# bytes after them, up to the sequence's length, join the matched text.
# RFC 2279 had 5 and 6 byte forms.
_CONTINUATION: Final = "%[89AB][0-9A-F]"
_OVERLONG_UTF8: Final = (
    "(?i:%C[01]%[89AB][0-9A-F]"
    f"|%E0%[89][0-9A-F](?:{_CONTINUATION})?"
    f"|%F0%8[0-9A-F](?:{_CONTINUATION}){{0,2}}"
    f"|%F8%8[0-7](?:{_CONTINUATION}){{0,3}}"
    f"|%FC%8[0-3](?:{_CONTINUATION}){{0,4}})"
)
# Regular expressions of the names whose spellings are not a fixed list.
_AMBIGUOUS_PATTERNS: Final = {"overlong_utf8": _OVERLONG_UTF8}
# Every name that `reject_ambiguous_paths` accepts.
AMBIGUOUS_NAMES: Final = (*AMBIGUOUS_SPELLINGS, *_AMBIGUOUS_PATTERNS)


class InvalidPathError(ValueError):
    """A request path that cannot be decoded; the proxy responds with 400."""


class AmbiguousPathRule:
    """The ambiguous spellings one listener rejects, compiled into one search.

    `search` scans a raw path, without its query, in one regular expression
    search however many names are listed, and returns a match object or
    None. The proxy calls it on every request, and `find` only to name what
    it found.
    """

    __slots__ = ("_pattern_by_name", "names", "search")

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(dict.fromkeys(names))
        unknown = [name for name in self.names if name not in AMBIGUOUS_NAMES]
        if unknown or not self.names:
            known = ", ".join(AMBIGUOUS_NAMES)
            raise ValueError(
                f"invalid ambiguous path names {unknown or '(none given)'}: "
                f"expected one or more of {known}"
            )
        patterns = {name: _name_pattern(name) for name in self.names}
        self._pattern_by_name = {
            name: re.compile(pattern) for name, pattern in patterns.items()
        }
        self.search = re.compile("|".join(patterns.values())).search

    def __repr__(self) -> str:
        return f"<AmbiguousPathRule {' '.join(self.names)}>"

    def find(self, path: str) -> tuple[str, str] | None:
        """Return the name and the text of the first spelling in `path`, or None."""
        match = self.search(path)
        if match is None:
            return None
        text = match.group()
        # The spellings of different names never overlap, so one name matches.
        for name, pattern in self._pattern_by_name.items():
            if pattern.fullmatch(text):
                return name, text
        raise AssertionError(f"no ambiguous path name matches {text!r}")


def needs_normalizing(path: str) -> bool:
    """Return whether `normalize_path` could change `path`."""
    return "%" in path or "/." in path or "//" in path


def normalize_path(path: str) -> str:
    """Return the path that routes match; raise InvalidPathError on a bad escape."""
    if not needs_normalizing(path):
        return path
    if "%" in path:
        path = _decode(path)
    if not path.startswith("/"):
        return path
    return _resolve(path)


def encode_path(path: str) -> str:
    """Percent-encode a normalised path again, for a request line."""
    return quote(path, safe=_PATH_SAFE, errors="surrogateescape")


def _name_pattern(name: str) -> str:
    pattern = _AMBIGUOUS_PATTERNS.get(name)
    if pattern is not None:
        return pattern
    return "|".join(map(_spelling_pattern, AMBIGUOUS_SPELLINGS[name]))


def _spelling_pattern(spelling: str) -> str:
    return "".join(
        f"[{char.upper()}{char.lower()}]" if char.isalpha() else re.escape(char)
        for char in spelling
    )


def _decode(path: str) -> str:
    bad = _BAD_ESCAPE_RE.search(path)
    if bad is not None:
        raise InvalidPathError(f"invalid percent-encoding at offset {bad.start()}")
    raw = unquote_to_bytes(path)
    if b"\0" in raw:
        raise InvalidPathError("the path decodes to a NUL byte")
    return raw.decode("utf-8", "surrogateescape")


def _resolve(path: str) -> str:
    parts = path.split("/")
    kept: list[str] = []
    for segment in parts[1:-1]:
        if segment == ".." and kept:
            kept.pop()
        elif segment not in ("", ".", ".."):
            kept.append(segment)
    last = parts[-1]
    if last == ".." and kept:
        kept.pop()
    if last in ("", ".", ".."):
        return "/" + "/".join(kept) + ("/" if kept else "")
    kept.append(last)
    return "/" + "/".join(kept)
