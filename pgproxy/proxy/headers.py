"""Header rewriting between downstream and upstream.

Invariant: no hop-by-hop field crosses the proxy (RFC 9110 section 7.6.1):
Connection, every field it names, Keep-Alive, TE, Trailer,
Transfer-Encoding, Upgrade and Proxy-Connection are dropped, and framing
headers are written fresh from the checked framing, so the peer on the far
side never sees the other side's framing. Upgrade is kept only for an
upgrade exchange. X-Forwarded-For, -Proto and -Host from the client are kept
only when the peer is a trusted proxy. Each head is built with one join of
the raw bytes received, without decoding.

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from typing import Final
from urllib.parse import unquote_to_bytes

from pgproxy.graph.paths import encode_path, needs_normalizing, normalize_path
from pgproxy.proxy.framing import (
    RequestInfo,
    ResponseInfo,
    connection_tokens,
    lower_names,
)

# A list, not a Sequence: mypyc indexes and iterates a list without the
# generic protocol calls.
Headers = list[tuple[bytes, bytes]]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
# Written fresh by the proxy in every upstream request head.
_REWRITTEN_REQUEST: Final = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"via",
    b"expect",
}
_REWRITTEN_RESPONSE: Final = HOP_BY_HOP | {b"via"}
VIA: Final = b"1.1 pgproxy"
_VIA_LINE: Final = b"Via: " + VIA + b"\r\n"
# The end of a request head with no received Via, body or Upgrade: the CRLF of
# the line before, this proxy's Via line and the empty line.
_VIA_AND_END: Final = b"\r\n" + _VIA_LINE + b"\r\n"


def is_trusted(peer_ip: str, networks: Sequence[IPNetwork]) -> bool:
    """Return whether `peer_ip` lies in one of the trusted proxy networks."""
    if not networks or not peer_ip:
        return False
    try:
        address = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def strip_routed_prefix(target: bytes, prefix: bytes) -> bytes:
    """Remove a route's path prefix from the target the route matched.

    The route matched the normalised path (`pgproxy.graph.paths`). When the
    client's spelling differs from it (`/api/./v1`, `/%61pi/v1`), the prefix
    is removed from the normalised path, which is then encoded again, as
    nginx does for a `proxy_pass` with a URI. Otherwise the target keeps the
    client's bytes. `prefix` is the route's prefix encoded the same way. A
    target without `%` that matched contains the prefix unencoded when the
    prefix has characters the encoding escapes, such as `{` or `|`.
    """
    path, mark, query = target.partition(b"?")
    text = path.decode("latin-1")
    if not needs_normalizing(text):
        if b"%" in prefix and not target.startswith(prefix):
            prefix = unquote_to_bytes(prefix)
        return strip_path_prefix(target, prefix)
    routed = encode_path(normalize_path(text)).encode("ascii")
    return strip_path_prefix(routed + mark + query, prefix)


def strip_path_prefix(target: bytes, prefix: bytes) -> bytes:
    """Remove a matched path prefix from an origin-form target.

    The result always starts with "/": stripping `/api` from `/api?x=1`
    gives `/?x=1`, and stripping `/api/` from `/api/v1` gives `/v1`.
    """
    if not prefix or not target.startswith(prefix):
        return target
    rest = target[len(prefix) :]
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest


class Forwarding:
    """Facts about the downstream peer, recorded once per connection."""

    __slots__ = ("client_ip", "proto", "trusted", "untrusted_fields")

    def __init__(self, client_ip: str, proto: bytes, trusted: bool) -> None:
        self.client_ip = client_ip.encode("ascii")
        self.proto = proto
        self.trusted = trusted
        # The X-Forwarded-For and -Proto lines that replace an untrusted
        # peer's, up to the value of X-Forwarded-Host: the same bytes for
        # every request of the connection, so they are joined once.
        self.untrusted_fields = (
            b"\r\nX-Forwarded-For: "
            + self.client_ip
            + b"\r\nX-Forwarded-Proto: "
            + proto
            + b"\r\nX-Forwarded-Host: "
        )


def build_request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    info: RequestInfo,
    host: bytes,
    forwarding: Forwarding,
    names: list[bytes] | None = None,
) -> bytes:
    """Build the request head sent upstream, as one bytes object.

    `host` is the Host value chosen by the cluster's host_header policy.
    `names` are the lower-case header names, parallel to `headers`; each
    header is forwarded with its name as received.
    A body is re-framed from `info`: chunked stays chunked, a length is
    sent as one Content-Length.
    """
    dropped = info.connection_tokens
    # Each field line starts with the CRLF that ends the line before it, so
    # the Host value needs no CRLF part of its own. Fewer parts make the
    # join cheaper.
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host]
    # None until a field needs them: most requests have none of these.
    forwarded_for: list[bytes] | None = None
    via: list[bytes] | None = None
    forwarded_proto = forwarded_host = b""
    if names is None:
        names = lower_names(headers)
    # Indexing `names`, not zip(strict=True): zip's keyword costs 0.15 µs a call.
    for i, (name, value) in enumerate(headers):
        lower = names[i]
        if lower in _REWRITTEN_REQUEST or lower in dropped:
            if lower == b"x-forwarded-for":
                if forwarded_for is None:
                    forwarded_for = []
                forwarded_for.append(value)
            elif lower == b"via":
                if via is None:
                    via = []
                via.append(value)
            elif lower == b"x-forwarded-proto":
                forwarded_proto = value
            elif lower == b"x-forwarded-host":
                forwarded_host = value
            continue
        parts.append(b"\r\n")
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
    if forwarding.trusted:
        if forwarded_for is None:
            client_chain = forwarding.client_ip
        else:
            forwarded_for.append(forwarding.client_ip)
            client_chain = b", ".join(forwarded_for)
        parts.append(b"\r\nX-Forwarded-For: ")
        parts.append(client_chain)
        parts.append(b"\r\nX-Forwarded-Proto: ")
        parts.append(forwarded_proto or forwarding.proto)
        parts.append(b"\r\nX-Forwarded-Host: ")
        parts.append(forwarded_host or info.host_raw or host)
    else:
        parts.append(forwarding.untrusted_fields)
        parts.append(info.host_raw or host)
    if (
        via is None
        and info.content_length is None
        and not info.chunked
        and info.upgrade is None
    ):
        parts.append(_VIA_AND_END)
        return b"".join(parts)
    parts.append(b"\r\n")
    parts.append(_VIA_LINE if via is None else _via_line(via))
    if info.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif info.content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % info.content_length)
    if info.upgrade is not None:
        parts += (b"Connection: upgrade\r\nUpgrade: ", info.upgrade, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def build_response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    info: ResponseInfo,
    *,
    chunked: bool,
    keep_alive: bool,
    client_http10: bool,
    names: list[bytes] | None = None,
) -> bytes:
    """Build the response head sent downstream, as one bytes object.

    `chunked` means the proxy re-frames the body as chunked (a chunked or
    close-delimited upstream body to an HTTP/1.1 client). `keep_alive`
    false adds `Connection: close`; an HTTP/1.0 client that keeps the
    connection gets `Connection: keep-alive` (RFC 9112 section 9.3).
    `names` are the lower-case header names, parallel to `headers`.
    """
    dropped = info.connection_tokens
    parts = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
    via: list[bytes] = []
    upgrade = b""
    if names is None:
        names = lower_names(headers)
    # Indexing `names`, not zip(strict=True): zip's keyword costs 0.15 µs a call.
    for i, (name, value) in enumerate(headers):
        lower = names[i]
        if lower in _REWRITTEN_RESPONSE or lower in dropped:
            if lower == b"via":
                via.append(value)
            elif lower == b"upgrade":
                upgrade = value
            continue
        if lower == b"content-length":
            # Written once below from the checked framing: "5, 5" or two
            # equal fields are valid (RFC 9110 section 8.6) but not every
            # client takes them.
            continue
        # Four appends, not `+=` a tuple: no tuple is built (compiled code).
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    parts.append(_via_line(via))
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif info.content_length is not None and status != 204:
        # RFC 9110 section 8.6: a 204 carries no Content-Length. A client
        # that read one as a body length would lose the next response.
        parts.append(b"Content-Length: %d\r\n" % info.content_length)
    if status == 101:
        parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    elif not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif client_http10:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def join_response_head(
    unchanged_lines: list[bytes],
    via: list[bytes],
    *,
    keep_alive: bool,
    client_http10: bool,
) -> bytes:
    """Join a head read by pgproxy/proxy/response_head.py for the client.

    `unchanged_lines` are the status line and the header lines forwarded as
    received. The proxy adds its Via and, like `build_response_head`, the
    Connection field the client needs. Such a head never needs chunked
    re-framing. The list is extended in place, because each read head is
    joined once.
    """
    parts = unchanged_lines
    parts.append(_via_line(via))
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif client_http10:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _via_line(received: list[bytes]) -> bytes:
    """Return the Via field: the values received, then this proxy."""
    if not received:
        return _VIA_LINE
    return b"Via: %b, %b\r\n" % (b", ".join(received), VIA)


def build_interim_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """Build a 1xx interim response head (such as 100 Continue or 103).

    Hop-by-hop fields and the fields that Connection names are dropped, as
    in a final response, and so is Content-Length, which no 1xx may carry
    (RFC 9110 section 8.6).
    """
    dropped = connection_tokens(
        [value for name, value in headers if name.lower() == b"connection"]
    )
    parts = [b"HTTP/1.1 ", str(status).encode(), b" ", reason, b"\r\n"]
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in dropped or lower == b"content-length":
            continue
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


class HeaderMap(Mapping[str, str]):
    """Lower-case name -> value view of raw headers, decoded on first use.

    Routing and hash keys read it only when a route has header conditions
    or a cluster hashes on a header, so most requests never decode headers.
    Repeated fields are joined with ", " (RFC 9110 section 5.3).
    """

    __slots__ = ("_map", "_raw")

    def __init__(self, raw: Headers) -> None:
        self._raw = raw
        self._map: dict[str, str] | None = None

    def _build(self) -> dict[str, str]:
        built: dict[str, str] = {}
        for name, value in self._raw:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            built[key] = f"{built[key]}, {text}" if key in built else text
        self._map = built
        return built

    def __getitem__(self, key: str) -> str:
        return (self._map or self._build())[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map or self._build())

    def __len__(self) -> int:
        return len(self._map or self._build())
