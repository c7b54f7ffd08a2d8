"""Consistent-hash keys: the `hash_key` setting and the key of a request.

A cluster parses its `hash_key` once into a HashKey, and the proxy calls
`HashKey.value` for each request. A query key is the raw argument value, not
percent-decoded, as nginx's `$arg_NAME` is, so both proxies hash the same
bytes. A missing or empty value is None, and the balancer then falls back to
round robin.
"""

from __future__ import annotations

from collections.abc import Mapping

KINDS = ("header", "cookie", "query", "path", "client_ip")


class HashKey:
    """A parsed `hash_key` setting.

    The setting is `header:NAME`, `cookie:NAME`, `query:NAME`, `path` or
    `client_ip`. `kind` is the part before the `:` and `name` the part after
    it, in lower case except for a cookie name. Raises ValueError for another
    kind.
    """

    __slots__ = ("_needle", "kind", "name")

    def __init__(self, spec: str) -> None:
        kind, _, name = spec.partition(":")
        if kind not in KINDS:
            raise ValueError(f'invalid hash key "{spec}"')
        self.kind = kind
        # Header names and query argument names match ignoring case, and
        # cookie names match exactly.
        self.name = name if kind == "cookie" else name.lower()
        # A query argument's name never contains "&" or "=", so a NAME with
        # one matches no argument, while a search for NAME= could find one.
        self._needle: str | None = None
        if "&" not in self.name and "=" not in self.name:
            self._needle = self.name + "="

    def __repr__(self) -> str:
        return f"<HashKey {self.kind}:{self.name}>"

    def value(
        self, headers: Mapping[str, str], path: str, query: str, client_ip: str
    ) -> str | None:
        """Return the key of one request, or None when it is missing or empty.

        `headers` maps lower-case names to values. `query` is the raw query
        string without the `?`.
        """
        kind = self.kind
        value: str | None
        if kind == "query":
            value = self._query_value(query)
        elif kind == "header":
            value = wire_text(headers.get(self.name))
        elif kind == "cookie":
            value = wire_text(cookie_value(headers.get("cookie"), self.name))
        elif kind == "path":
            value = path
        else:
            value = client_ip
        return value or None

    def _query_value(self, query: str) -> str | None:
        needle = self._needle
        if needle is None or not query:
            return None
        # A query that starts with NAME= in lower case needs no search,
        # because its first argument is the first match.
        start = 0
        if not query.startswith(needle):
            # The proxy accepts only ASCII targets, and lowering ASCII keeps
            # each character at its index, so an index found in `lowered` is
            # the same index in `query`. Other text goes the slow way.
            lowered = query.lower()
            if len(lowered) != len(query):
                return query_value(query, self.name)
            start = find_argument(lowered, needle)
            if start < 0:
                return None
        end = query.find("&", start)
        if end < 0:
            end = len(query)
        return query[start + len(needle) : end]


def wire_text(value: str | None) -> str | None:
    """Return a header value so that its UTF-8 encoding is its bytes on the wire.

    The proxy decodes header values as latin-1, one character per byte, and
    the ring hashes the UTF-8 encoding of a key. nginx hashes the bytes as
    received, so a value with bytes above 0x7F is turned back into those
    bytes, carried as surrogates where they are not UTF-8.
    """
    if value is None or value.isascii():
        return value
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:
        return value
    return raw.decode("utf-8", "surrogateescape")


def find_argument(query: str, needle: str) -> int:
    """Return the index of the first argument that starts with `needle`, or -1.

    `needle` is `NAME=`. An argument starts at the beginning of `query` or
    after a `&`. Searching for it saves splitting the query into a list.
    """
    start = 0
    while True:
        found = query.find(needle, start)
        if found <= 0 or query[found - 1] == "&":
            return found
        start = found + 1


def query_value(query: str, name: str) -> str | None:
    """Return the raw value of the first argument `name` (lower-case) in `query`.

    nginx's `$arg_NAME` compares names ignoring case, does not decode, and
    takes the first occurrence. An argument without `=` does not count.
    """
    for pair in query.split("&"):
        arg_name, sep, value = pair.partition("=")
        if sep and arg_name.lower() == name:
            return value
    return None


def cookie_value(header: str | None, name: str) -> str | None:
    """Return the value of cookie `name` in a Cookie header, without quotes."""
    # RFC 6265 section 5.4: pairs separated by "; ", first occurrence wins.
    if not header:
        return None
    for pair in header.split(";"):
        cookie_name, sep, value = pair.strip().partition("=")
        if sep and cookie_name == name:
            return value.strip('"')
    return None
