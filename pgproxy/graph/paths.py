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
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_to_bytes

_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# RFC 3986 section 3.3: pchar and "/" stay as they are when a normalised path
# is encoded again for the upstream.
_PATH_SAFE = "/!$&'()*+,;=:@-._~"


class InvalidPathError(ValueError):
    """A request path that cannot be decoded; the proxy responds with 400."""


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
