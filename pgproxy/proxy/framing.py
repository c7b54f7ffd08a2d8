"""Message framing and request-head checks for HTTP/1.1 (RFC 9112).

Invariant: a request head that passes `check_request_head` has exactly one
way to find where its body ends (RFC 9112 section 6.3), a single Host, a
request-target in a form the proxy can route, and header fields free of the
shapes used for request smuggling. Anything else raises `FramingError`
carrying the status to answer with, before a route is chosen or an upstream
is opened. llhttp already rejects most of these shapes while parsing; the
checks here repeat them on the parsed fields, so the rule holds whatever the
parser's leniency settings are.

The common, clean heads are also checked in C (pgproxy/proxy/_request_head.c)
when it is built, with the compiled modules. The C check returns None for any
head it is not sure about, and `check_request_head_python` then decides it:
it is the reference and the fallback. tests/proxy/test_request_head_c.py
checks on a seeded corpus of mutated heads that the C check returns None or
the same RequestInfo, and never accepts a head that the Python check rejects.

Pure: no I/O, no clock. Header names and values are the raw bytes received.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from pgproxy import compiled
from pgproxy.errors import DownstreamError

# The result of the C check's check_head for a head it accepts: target,
# host_raw, Content-Length or None, Connection options or None, keep_alive,
# expect_continue, has_idempotency_key.
CResult = tuple[bytes, bytes, int | None, frozenset[bytes] | None, bool, bool, bool]
CCheckHead = Callable[
    [
        bytes,
        str,
        list[tuple[bytes, bytes]],
        list[bytes] | None,
        dict[bytes, frozenset[bytes]],
    ],
    CResult | None,
]

# RFC 9110 section 5.1: field-name = token. \Z, not $, which also matches
# before a final newline.
TOKEN_RE: Final = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Names that passed TOKEN_RE, as received, mapped to their lower-case form.
# Clients send the same few names, and a dict lookup costs a fraction of a
# regex match or of bytes.lower(). Each lower-case name is then the same
# object on every request, with its hash cached for later set lookups.
# Bounded like _HOSTS below.
_TOKEN_NAMES: Final[dict[bytes, bytes]] = {}
_MAX_CACHED_TOKEN: Final = 64
_MAX_CACHED_TOKENS: Final = 1024


def byte_map(allowed: Callable[[int], bool]) -> bytes:
    """Return a bytes.translate table that changes exactly the bytes not allowed.

    `data.translate(table) != data` is then true when `data` has a byte that
    is not allowed, at about half the cost of a regex search (timeit). When
    nothing changes, translate returns `data` itself, so the usual case
    allocates nothing and the comparison stops at the identity.
    """
    table = bytearray(range(256))
    for byte in range(256):
        if not allowed(byte):
            # Any other value will do: 0, or 1 for the byte 0 itself.
            table[byte] = 1 if byte == 0 else 0
    return bytes(table)


# RFC 9110 section 5.5: field-value is VCHAR, obs-text, SP and HTAB; CR, LF, NUL
# and other controls are invalid anywhere in it.
_FIELD_VALUE_MAP: Final = byte_map(lambda b: b == 0x09 or 0x20 <= b != 0x7F)
_DIGITS_RE: Final = re.compile(rb"^[0-9]{1,18}\Z")
# RFC 9112 section 3.2: origin-form, absolute-form, authority-form, asterisk-form.
# Origin-form is absolute-path ["?" query], and neither allows "#": a fragment
# is never sent. Servers behind the proxy cut the path at "#", so a target
# with one could match one route here and reach another path there: 400.
_TARGET_MAP: Final = byte_map(lambda b: 0x21 <= b <= 0x7E and b != 0x23)
_ABSOLUTE_FORM_RE: Final = re.compile(rb"^(?i:https?)://([^/?#@\s]+)([!-\"$-~]*)\Z")
# RFC 9112 section 3.2: a Host value is uri-host [":" port] of RFC 3986
# section 3.2.2: an IP literal in brackets, or a reg-name (IPv4 included) of
# unreserved characters, sub-delims and %HH escapes, then a port of digits.
# Anything else gets 400, because an upstream may read `a.example\`,
# `a.example?` or `x:a.example` as a.example while routing here saw another host.
_HOST_RE: Final = re.compile(
    rb"^(?:\[(?:[0-9A-Fa-f:.]+|[vV][0-9A-Fa-f]+\.[-A-Za-z0-9._~!$&'()*+,;=:]+)\]"
    rb"|(?:[-A-Za-z0-9._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?\Z"
)
# Called directly, where compiled code would look `value.strip` up by name.
_strip: Final = bytes.strip

NO_BODY_STATUSES: Final = frozenset({204, 304})
# Host values decoded by host_without_port: a DNS name (253) with a port fits.
_HOSTS: Final[dict[bytes, str]] = {}
_MAX_CACHED_HOST: Final = 300
_MAX_CACHED_HOSTS: Final = 1024
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
COMMON_CONNECTION_TOKENS: Final = {
    value: frozenset({value.lower()})
    for value in (
        b"keep-alive",
        b"Keep-Alive",
        b"close",
        b"Close",
        b"upgrade",
        b"Upgrade",
    )
}


class FramingError(DownstreamError):
    """A request head violates HTTP/1.1 framing or syntax; `status` is the reply."""


class RequestInfo:
    """Framing and connection facts from the head of one request.

    `content_length` is None unless the body is length-delimited; `chunked`
    is true for a chunked body; with neither, the request has no body (RFC
    9112 section 6.3 rule 6). `host` is lower-case without a port. `path`
    is the request-target as routed (origin-form, from absolute-form when
    needed), and `connection_tokens` the lower-cased Connection options.
    """

    __slots__ = (
        "chunked",
        "connection_tokens",
        "content_length",
        "expect_continue",
        "has_idempotency_key",
        "host",
        "host_raw",
        "keep_alive",
        "target",
        "upgrade",
    )

    def __init__(self) -> None:
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.host: str | None = None
        self.host_raw = b""
        self.target = b"/"
        self.connection_tokens: frozenset[bytes] = _NO_TOKENS
        self.has_idempotency_key = False

    @property
    def has_body(self) -> bool:
        """Whether a body follows the head (possibly an empty chunked one)."""
        return self.chunked or bool(self.content_length)


def check_version(version: str) -> None:
    """Reject every HTTP version except 1.0 and 1.1 with 505."""
    if version not in ("1.1", "1.0"):
        raise FramingError(f"HTTP version {version} is not supported", status=505)


def check_target(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """Return the origin-form target and the authority of an absolute-form one.

    RFC 9112 section 3.2: asterisk-form is only for OPTIONS, and
    authority-form only for CONNECT, which a reverse proxy does not serve.
    """
    if target.startswith(b"/") and target.translate(_TARGET_MAP) == target:
        return target, None
    if target == b"*":
        if method != b"OPTIONS":
            raise FramingError("asterisk-form target is only valid for OPTIONS")
        return target, None
    if method == b"CONNECT":
        raise FramingError("CONNECT is not supported", status=501)
    match = _ABSOLUTE_FORM_RE.match(target)
    if match is None:
        raise FramingError("invalid request-target")
    path = match.group(2) or b"/"
    if not path.startswith(b"/"):
        if not path.startswith(b"?"):
            raise FramingError("invalid request-target")
        path = b"/" + path
    return path, match.group(1)


def lower_field_name(name: bytes) -> bytes:
    """Return the lower-case form of a header name, cached for valid tokens."""
    lower = _TOKEN_NAMES.get(name)
    if lower is None:
        lower = name.lower()
        if TOKEN_RE.match(name):
            _cache_token(name, lower)
    return lower


def _cache_token(name: bytes, lower: bytes) -> None:
    if len(name) <= _MAX_CACHED_TOKEN:
        if len(_TOKEN_NAMES) >= _MAX_CACHED_TOKENS:
            _TOKEN_NAMES.clear()
        _TOKEN_NAMES[name] = lower


def check_field(name: bytes, value: bytes) -> None:
    """Reject a header field whose name is not a token or whose value has controls."""
    if name not in _TOKEN_NAMES:
        if not TOKEN_RE.match(name):
            raise FramingError("invalid header field name")
        _cache_token(name, name.lower())
    if value.translate(_FIELD_VALUE_MAP) != value:
        raise FramingError("invalid character in header field value")


def parse_content_length(values: list[bytes]) -> int:
    """Return the one Content-Length that all values agree on.

    RFC 9110 section 8.6 lets a recipient accept a list of identical values;
    differing values (or anything but digits) make the framing unknowable.
    """
    # One plain number, the usual case, skips the split (about 0.3 µs a head).
    if len(values) == 1 and values[0].isdigit() and len(values[0]) <= 18:
        return int(values[0])
    lengths = set()
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not _DIGITS_RE.match(item):
                raise FramingError("invalid Content-Length")
            lengths.add(int(item))
    if len(lengths) != 1:
        raise FramingError("conflicting Content-Length values")
    return lengths.pop()


def check_transfer_encoding(values: list[bytes]) -> None:
    """Accept only a Transfer-Encoding whose single coding is chunked.

    RFC 9112 section 6.3: a request whose final coding is not chunked has no
    determinable length (400). Codings other than chunked are not
    implemented by this proxy, so `gzip, chunked` gets 501 (RFC 9112
    section 6.1).
    """
    codings = [
        item.strip(b" \t").lower() for value in values for item in value.split(b",")
    ]
    if not codings or codings[-1] != b"chunked":
        raise FramingError("Transfer-Encoding must end with chunked")
    if codings.count(b"chunked") > 1:
        raise FramingError("chunked applied more than once")
    if len(codings) > 1:
        raise FramingError("only the chunked transfer coding is supported", status=501)


def connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """Return the lower-cased options listed in Connection header values."""
    # Most heads have no Connection field or one common value: both skip the
    # split (0.2-0.3 µs a head).
    if not values:
        return _NO_TOKENS
    if len(values) == 1:
        common = COMMON_CONNECTION_TOKENS.get(values[0])
        if common is not None:
            return common
    return frozenset(
        token
        for value in values
        for item in value.split(b",")
        if (token := item.strip(b" \t").lower())
    )


def lower_names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Return the lower-case name of each header, in order."""
    return [name.lower() for name, _ in headers]


def _load_c_check() -> CCheckHead | None:
    """Import the C check if pgproxy/compiled.py chose it for this process."""
    if compiled.C_REQUEST_HEAD not in compiled.C_MODULES_USED:
        return None
    from pgproxy.proxy._request_head import check_head

    return check_head


# The fast path in C (pgproxy/proxy/_request_head.c), or None to run only the
# Python check.
_C_CHECK_HEAD: Final = _load_c_check()


def check_request_head(
    method: bytes,
    target: bytes,
    version: str,
    headers: list[tuple[bytes, bytes]],
    names: list[bytes] | None = None,
) -> RequestInfo:
    """Check one parsed request head and return its framing.

    `names` are the lower-case header names, parallel to `headers`; the
    parser callbacks collect them so that no later step lower-cases again.

    The C check decides the common heads when it is built and used
    (pgproxy/compiled.py), and `check_request_head_python` decides the
    others. Both return the same RequestInfo for a head the C check accepts.

    Raises FramingError with 400 for smuggling-shaped or malformed heads,
    501 for an unsupported transfer coding or CONNECT, and 505 for an HTTP
    version other than 1.0 or 1.1.
    """
    if _C_CHECK_HEAD is not None:
        info = check_request_head_c(_C_CHECK_HEAD, target, version, headers, names)
        if info is not None:
            return info
    return check_request_head_python(method, target, version, headers, names)


def check_request_head_c(
    check_head: CCheckHead,
    target: bytes,
    version: str,
    headers: list[tuple[bytes, bytes]],
    names: list[bytes] | None = None,
) -> RequestInfo | None:
    """Check a clean, common request head with the C `check_head`, or return None.

    None means that the C check is not sure about the head, and
    `check_request_head_python` must decide it. The C check accepts only
    origin-form targets, so it needs no method.
    """
    found = check_head(target, version, headers, names, COMMON_CONNECTION_TOKENS)
    if found is None:
        return None
    target, raw, length, options, keep_alive, expect_continue, has_key = found
    info = RequestInfo()
    info.target = target
    info.host_raw = raw
    if raw:
        # The C check reads the Host's bytes, not its grammar: the Python
        # check decides a value that host_without_port rejects.
        try:
            info.host = host_without_port(raw)
        except FramingError:
            return None
    info.content_length = length
    if options is not None:
        info.connection_tokens = options
    info.keep_alive = keep_alive
    info.expect_continue = expect_continue
    info.has_idempotency_key = has_key
    return info


def check_request_head_python(
    method: bytes,
    target: bytes,
    version: str,
    headers: list[tuple[bytes, bytes]],
    names: list[bytes] | None = None,
) -> RequestInfo:
    """Check one parsed request head in Python and return its framing.

    The reference for the C check, and its fallback. Arguments, result and
    errors are those of `check_request_head`.
    """
    check_version(version)
    info = RequestInfo()
    info.target, authority = check_target(method, target)
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    if names is None:
        names = lower_names(headers)
    # Indexing `names`, not zip(strict=True): zip's keyword costs 0.15 µs a call.
    for i, (name, value) in enumerate(headers):
        lower = names[i]
        check_field(name, value)
        if lower == b"host":
            hosts.append(value)
        elif lower == b"content-length":
            lengths.append(value)
        elif lower == b"transfer-encoding":
            codings.append(value)
        elif lower == b"connection":
            connection.append(value)
        elif lower == b"expect":
            # RFC 9110 section 10.1.1: 100-continue is the only expectation.
            if value.strip(b" \t").lower() != b"100-continue":
                raise FramingError("unsupported expectation", status=417)
            info.expect_continue = version == "1.1"
        elif lower == b"upgrade":
            info.upgrade = value
        elif lower == b"idempotency-key":
            info.has_idempotency_key = True
    _set_host(info, hosts, authority, version)
    _set_body_framing(info, lengths, codings, version)
    info.connection_tokens = connection_tokens(connection)
    info.keep_alive = _keep_alive(info.connection_tokens, version)
    if info.upgrade is not None and b"upgrade" not in info.connection_tokens:
        info.upgrade = None
    return info


def _set_host(
    info: RequestInfo, hosts: list[bytes], authority: bytes | None, version: str
) -> None:
    # RFC 9112 section 3.2: exactly one Host in HTTP/1.1, also next to an
    # absolute-form target, whose authority then wins over the Host header.
    if len(hosts) > 1:
        raise FramingError("more than one Host header")
    if not hosts and version == "1.1":
        raise FramingError("missing Host header")
    if (
        authority is not None
        and hosts
        and hosts[0].strip(b" \t").lower() != authority.lower()
    ):
        raise FramingError("Host header differs from the absolute-form target")
    raw = (
        authority
        if authority is not None
        else (_strip(hosts[0], b" \t") if hosts else b"")
    )
    info.host_raw = raw
    info.host = host_without_port(raw) if raw else None


def host_without_port(raw: bytes) -> str:
    """Return the lower-case host of a Host value, without its port.

    Raises FramingError (400) when `raw` is not a valid Host value.
    """
    # A client sends the same Host on every request of a connection: a cache
    # hit costs about a quarter of the decoding (callgrind). Only short values
    # are kept, and the cache empties when full, so its memory stays bounded.
    host = _HOSTS.get(raw)
    if host is None:
        host = _decode_host(raw)
        if len(raw) <= _MAX_CACHED_HOST:
            if len(_HOSTS) >= _MAX_CACHED_HOSTS:
                _HOSTS.clear()
            _HOSTS[raw] = host
    return host


def _decode_host(raw: bytes) -> str:
    # Only valid values are cached, so a cache hit needs no check.
    if _HOST_RE.match(raw) is None:
        raise FramingError("invalid Host header")
    text = raw.decode("latin-1").lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end > 0 else text
    return text.partition(":")[0]


def _set_body_framing(
    info: RequestInfo, lengths: list[bytes], codings: list[bytes], version: str
) -> None:
    if codings:
        # RFC 9112 section 6.1: Transfer-Encoding in HTTP/1.0 or next to
        # Content-Length means the framing cannot be trusted.
        if version == "1.0":
            raise FramingError("Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise FramingError("both Content-Length and Transfer-Encoding")
        check_transfer_encoding(codings)
        info.chunked = True
    elif lengths:
        info.content_length = parse_content_length(lengths)


def _keep_alive(tokens: frozenset[bytes], version: str) -> bool:
    if b"close" in tokens:
        return False
    return version == "1.1" or b"keep-alive" in tokens


class ResponseInfo:
    """Body framing of one upstream response, from its head.

    `body` is "none", "length", "chunked" or "close" (read until the
    connection closes, RFC 9112 section 6.3 rule 8).
    """

    __slots__ = ("body", "connection_tokens", "content_length", "keep_alive")

    def __init__(self) -> None:
        self.body = "none"
        self.content_length: int | None = None
        self.keep_alive = True
        self.connection_tokens: frozenset[bytes] = _NO_TOKENS


class BadResponseError(ValueError):
    """An upstream response head cannot be framed safely."""


def check_response_head(
    status: int,
    version: str,
    headers: list[tuple[bytes, bytes]],
    head: bool,
    names: list[bytes] | None = None,
) -> ResponseInfo:
    """Decide how the body of a response to `head` (a HEAD request) is framed.

    `names` are the lower-case header names, parallel to `headers`.

    Raises BadResponseError for conflicting framing, which the proxy turns
    into a 502 instead of guessing where the body ends, and for a status
    code outside 100-599.
    """
    if status < 100 or status > 599:
        # RFC 9110 section 15 defines codes 100-599, and a client should treat
        # any other three-digit code as a 5xx. llhttp (httptools 0.9.0)
        # accepts any three digits, so the range is checked here.
        raise BadResponseError(f"status code {status} is outside 100-599")
    info = ResponseInfo()
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    if names is None:
        names = lower_names(headers)
    # Indexing `names`, not zip(strict=True): zip's keyword costs 0.15 µs a call.
    for i, (_, value) in enumerate(headers):
        lower = names[i]
        if lower == b"content-length":
            lengths.append(value)
        elif lower == b"transfer-encoding":
            codings.append(value)
        elif lower == b"connection":
            connection.append(value)
    info.connection_tokens = connection_tokens(connection)
    info.keep_alive = _keep_alive(info.connection_tokens, version)
    if lengths and codings:
        raise BadResponseError("both Content-Length and Transfer-Encoding")
    try:
        if lengths:
            info.content_length = parse_content_length(lengths)
        if codings:
            check_transfer_encoding(codings)
    except FramingError as exc:
        raise BadResponseError(str(exc)) from None
    if head or status < 200 or status in NO_BODY_STATUSES:
        return info
    if codings:
        info.body = "chunked"
    elif info.content_length is not None:
        info.body = "length" if info.content_length else "none"
    else:
        info.body = "close"
        info.keep_alive = False
    return info
