"""Malformed and smuggling-shaped requests against a real pgproxy process.

Each case is sent as raw bytes on a new connection. pgproxy must respond
with the exact status listed and close the connection, because the framing
of anything that follows can no longer be trusted. It must send nothing more
and let nothing reach the upstream: after each case a valid canary request
goes through, and the canary must be the only request the upstream saw.

Status choices follow RFC 9112 (HTTP/1.1 messages) and RFC 9110 (semantics);
each case names the rule it rests on. Where the RFCs allow either rejecting
or repairing a message, pgproxy rejects: a proxy that repairs a message can
disagree with the upstream about where a request ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from e2e_client import RawConnection, Response, build_request, echo_of
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"
header_read_timeout = "3s"
max_header_bytes = "8KiB"
max_body_bytes = "64KiB"

[[routes]]
path_prefix = "/"
cluster = "a"

[clusters.a]
endpoints = ["{a}"]
"""


@dataclass(frozen=True)
class Case:
    """One raw request, the status pgproxy must respond with, and the rule behind it."""

    id: str
    data: bytes
    status: int
    rule: str


H = b"Host: test.local\r\n"
HIDDEN = b"GET /hidden HTTP/1.1\r\nHost: test.local\r\n\r\n"

CASES = [
    # --- Content-Length and Transfer-Encoding together ---------------------
    Case(
        "cl-then-te",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 6.1/6.3: both framings present is the classic smuggling shape; "
        "rejected",
    ),
    Case(
        "te-then-cl",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        + b"5\r\nhello\r\n0\r\n\r\n",
        400,
        "RFC 9112 6.1/6.3: both framings present, in the other order",
    ),
    # --- Content-Length values ---------------------------------------------
    Case(
        "cl-duplicate-differing",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
        "RFC 9112 6.3 rule 5: differing Content-Length values are unrecoverable "
        "framing",
    ),
    Case(
        "cl-list",
        b"POST /x HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\nhello!",
        400,
        "RFC 9110 8.6: a list of differing lengths is invalid",
    ),
    Case(
        "cl-negative",
        b"POST /x HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
        400,
        "RFC 9110 8.6: Content-Length = 1*DIGIT",
    ),
    Case(
        "cl-non-numeric",
        b"POST /x HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n",
        400,
        "RFC 9110 8.6: Content-Length = 1*DIGIT",
    ),
    Case(
        "cl-overflow",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Content-Length: 99999999999999999999999\r\n\r\n",
        400,
        "RFC 9110 8.6: a length that overflows must not be parsed into a wrong value",
    ),
    Case(
        "cl-plus-sign",
        b"POST /x HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
        400,
        "RFC 9110 8.6: Content-Length = 1*DIGIT, a sign is not a digit",
    ),
    # --- chunked framing -----------------------------------------------------
    Case(
        "chunk-size-not-hex",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
        "RFC 9112 7.1: chunk-size = 1*HEXDIG",
    ),
    Case(
        "chunk-size-overflow",
        b"POST /x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        400,
        "RFC 9112 7.1: a chunk size that overflows 64 bits cannot be parsed reliably",
    ),
    Case(
        "chunk-size-trailing-junk",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n5 junk\r\nhello\r\n0\r\n\r\n",
        400,
        "RFC 9112 7.1.1: after the size only BWS ';' chunk-ext may follow",
    ),
    Case(
        "chunk-size-bare-lf",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        400,
        "RFC 9112 7.1: chunk-size line ends in CRLF; a bare LF is a parser "
        "differential",
    ),
    Case(
        "chunk-data-overrun",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
        400,
        "RFC 9112 7.1: chunk-data of chunk-size octets must be followed by CRLF",
    ),
    # --- Transfer-Encoding values ------------------------------------------
    Case(
        "te-chunked-not-final",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 6.3 rule 4: chunked not the final coding of a request: MUST 400 and "
        "close",
    ),
    Case(
        "te-gzip-only",
        b"POST /x HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nhello",
        400,
        "RFC 9112 6.3 rule 4: without a final chunked the length is unknown: MUST 400",
    ),
    Case(
        "te-gzip-then-chunked",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
        "RFC 9112 6.1: a transfer coding the server does not understand: SHOULD 501",
    ),
    Case(
        "te-lookalike",
        b"POST /x HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 6.3 rule 4: 'xchunked' is not chunked, so the length is unknown",
    ),
    Case(
        "te-chunked-twice",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
        "RFC 9112 6.1: chunked MUST NOT be applied more than once",
    ),
    Case(
        "te-obs-fold",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 5.2: obs-fold may be rejected; folded TE hides chunked from some "
        "parsers",
    ),
    Case(
        "te-space-before-colon",
        b"POST /x HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 5.1: whitespace between field name and colon: MUST 400",
    ),
    Case(
        "te-in-http10",
        b"POST /x HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "RFC 9112 6.1: TE in an HTTP/1.0 message MUST be treated as faulty framing",
    ),
    # --- header syntax -----------------------------------------------------
    Case(
        "obs-fold",
        b"GET /x HTTP/1.1\r\n" + H + b"X-Folded: first\r\n second\r\n\r\n",
        400,
        "RFC 9112 5.2: obs-fold outside message/http: reject with 400 (or replace; "
        "pgproxy rejects)",
    ),
    Case(
        "header-name-space",
        b"GET /x HTTP/1.1\r\n" + H + b"X Bad: 1\r\n\r\n",
        400,
        "RFC 9110 5.1: field-name = token, SP is not a tchar",
    ),
    Case(
        "header-name-invalid-char",
        b"GET /x HTTP/1.1\r\n" + H + b"Bad[Name]: 1\r\n\r\n",
        400,
        "RFC 9110 5.1: '[' and ']' are not tchars",
    ),
    Case(
        "header-name-empty",
        b"GET /x HTTP/1.1\r\n" + H + b": value\r\n\r\n",
        400,
        "RFC 9110 5.1: field-name = token = 1*tchar",
    ),
    Case(
        "header-without-colon",
        b"GET /x HTTP/1.1\r\n" + H + b"X-No-Colon\r\n\r\n",
        400,
        "RFC 9112 5: field-line = field-name ':' OWS field-value OWS",
    ),
    Case(
        "nul-in-value",
        b"GET /x HTTP/1.1\r\n" + H + b"X-Value: a\x00b\r\n\r\n",
        400,
        "RFC 9110 5.5: NUL in a field value: reject (or replace; pgproxy rejects)",
    ),
    Case(
        "bare-cr-in-value",
        b"GET /x HTTP/1.1\r\n" + H + b"X-Value: a\rb\r\n\r\n",
        400,
        "RFC 9112 2.2: a bare CR MUST be considered invalid (or replaced; pgproxy "
        "rejects)",
    ),
    Case(
        "bare-lf-in-value",
        b"GET /x HTTP/1.1\r\n" + H + b"X-Value: a\nX-Injected: b\r\n\r\n",
        400,
        "RFC 9112 2.2: bare LF as terminator is only a MAY; pgproxy requires CRLF",
    ),
    Case(
        "bare-lf-line-endings",
        b"GET /x HTTP/1.1\nHost: test.local\n\n",
        400,
        "RFC 9112 2.2: a recipient MAY accept bare LF; pgproxy does not, closing a "
        "differential",
    ),
    Case(
        "whitespace-before-first-header",
        b"GET /x HTTP/1.1\r\n Host: test.local\r\n\r\n",
        400,
        "RFC 9112 2.2: whitespace after the start-line: reject or ignore the line; "
        "rejected",
    ),
    # --- Host ----------------------------------------------------------------
    Case(
        "host-missing",
        b"GET /x HTTP/1.1\r\nX-Other: 1\r\n\r\n",
        400,
        "RFC 9112 3.2: an HTTP/1.1 request without Host: MUST 400",
    ),
    Case(
        "host-missing-absolute-form",
        b"GET http://test.local/x HTTP/1.1\r\nX-Other: 1\r\n\r\n",
        400,
        "RFC 9112 3.2: the MUST 400 covers any HTTP/1.1 request without Host, "
        "also one whose target names the authority",
    ),
    Case(
        "host-twice",
        b"GET /x HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        400,
        "RFC 9112 3.2: more than one Host field line: MUST 400",
    ),
    Case(
        "host-invalid",
        b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n",
        400,
        "RFC 9112 3.2: a Host with an invalid value: MUST 400",
    ),
    *(
        Case(
            f"host-invalid-{name}",
            b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
            400,
            "RFC 9112 3.2: a Host that is not uri-host [: port] (RFC 3986 3.2.2): "
            "an upstream that cuts it at the odd byte reads another host",
        )
        for name, host in [
            ("backslash", b"a.example\\"),
            ("question-mark", b"a.example?"),
            ("hash", b"a.example#"),
            ("non-ascii", b"a.example\xc2\xa0"),
            ("port-not-digits", b"a.example:x"),
            ("two-colons", b"x:a.example"),
            ("bracketed-name", b"[a.example]"),
            ("unclosed-bracket", b"[::1"),
            ("bad-escape", b"a%zz.example"),
        ]
    ),
    Case(
        "absolute-form-host-mismatch",
        b"GET http://other.example/x HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "RFC 9112 3.2.2: the target's host overrides Host; a gateway that sees two "
        "different hosts rejects instead of routing on one and forwarding the other",
    ),
    # --- request line --------------------------------------------------------
    Case(
        "request-line-extra-space",
        b"GET  /x HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "RFC 9112 3: an invalid request-line SHOULD get 400; pgproxy does not use the "
        "MAY of parsing on whitespace boundaries",
    ),
    Case(
        "request-line-extra-space-echoed-in-field",
        b"GET  /x HTTP/1.1\r\nX: GET /x HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "RFC 9112 3: the one-SP check must find the request line itself, not the "
        "same bytes inside a field value",
    ),
    Case(
        "request-line-trailing-junk",
        b"GET /x HTTP/1.1 extra\r\n" + H + b"\r\n",
        400,
        "RFC 9112 3: request-line = method SP request-target SP HTTP-version",
    ),
    Case(
        "space-in-target",
        b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "RFC 9112 3.2: whitespace in the request-target is invalid: 400",
    ),
    Case(
        "nul-in-target",
        b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "RFC 9112 3.2 / RFC 3986: NUL is not allowed in a request-target",
    ),
    Case(
        "target-not-origin-form",
        b"GET x HTTP/1.1\r\n" + H + b"\r\n",
        400,
        "RFC 9112 3.2: origin-form starts with '/'",
    ),
    Case(
        "version-malformed",
        b"GET /x HTTP/1.1x\r\n" + H + b"\r\n",
        400,
        "RFC 9112 2.3: HTTP-version = 'HTTP/' DIGIT '.' DIGIT",
    ),
    Case(
        "version-http2",
        b"GET /x HTTP/2.0\r\n" + H + b"\r\n",
        505,
        "RFC 9110 15.6.6: major version 2 is not supported over this connection",
    ),
    Case(
        "version-http3",
        b"GET /x HTTP/3.0\r\n" + H + b"\r\n",
        505,
        "RFC 9110 15.6.6: major version 3 is not supported",
    ),
    # --- size limits (listener: 8 KiB head, 64 KiB body) ---------------------
    Case(
        "request-line-too-long",
        b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n" + H + b"\r\n",
        431,
        "max_header_bytes covers the request line and headers; 431 above it (RFC 6585 "
        "5)",
    ),
    Case(
        "header-block-too-large",
        b"GET /x HTTP/1.1\r\n"
        + H
        + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 100) for i in range(100))
        + b"\r\n",
        431,
        "RFC 6585 5: header fields too large",
    ),
    Case(
        "content-length-over-limit",
        b"POST /x HTTP/1.1\r\n" + H + b"Content-Length: 1000000\r\n\r\n",
        413,
        "RFC 9110 15.5.14: content larger than max_body_bytes, decided from "
        "Content-Length",
    ),
    # --- pipelined smuggling -------------------------------------------------
    Case(
        "cl-te-hidden-request",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Content-Length: %d\r\n" % (5 + len(HIDDEN))
        + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        + HIDDEN,
        400,
        "CL.TE: a TE-parsing hop would see /hidden as a second request; the whole "
        "connection is refused",
    ),
    Case(
        "te-cl-hidden-request",
        b"POST /x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
        + b"%x\r\n" % len(HIDDEN)
        + HIDDEN
        + b"\r\n0\r\n\r\n",
        400,
        "TE.CL: a CL-parsing hop would see /hidden as a second request",
    ),
    Case(
        "bad-then-pipelined-body",
        b"GET /x HTTP/1.1\r\n" + H + b"X-No-Colon\r\n\r\n"
        b"POST /second HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
        400,
        "after a 400 the connection's framing is lost, so the next request is never "
        "read",
    ),
]


@pytest.fixture(scope="module")
def upstream(module_upstream_factory: UpstreamFactory) -> Upstream:
    return module_upstream_factory("a")


@pytest.fixture(scope="module")
def proxy(module_pgproxy_factory: PgproxyFactory, upstream: Upstream) -> PgproxyProcess:
    return module_pgproxy_factory(CONFIG.format(a=upstream.address))


@pytest.fixture(autouse=True)
def fresh_upstream(upstream: Upstream) -> Iterator[None]:
    upstream.reset()
    yield


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_rejected_before_upstream(
    proxy: PgproxyProcess, upstream: Upstream, case: Case
) -> None:
    with RawConnection(proxy.port()) as conn:
        conn.send(case.data)
        response = conn.read_response()
        assert response.status == case.status, (
            f"{case.id}: expected {case.status} ({case.rule}), "
            f"got:\n{response.describe()}"
        )
        assert (response.header("connection") or "").lower() == "close", (
            f"{case.id}: the {case.status} should say Connection: "
            f"close:\n{response.describe()}"
        )
        assert (response.header("content-type") or "").startswith("text/plain"), (
            response.describe()
        )
        extra = conn.wait_closed(5)
        assert extra is not None, (
            f"{case.id}: pgproxy kept the connection open after {case.status}"
        )
        assert extra == b"", (
            f"{case.id}: pgproxy sent more after the {case.status}: {extra[:200]!r}"
        )

    canary = f"/canary/{case.id}"
    assert echo_of(_send(proxy, canary))["target"] == canary
    seen = [request.target for request in upstream.requests]
    assert seen == [canary], (
        f"{case.id}: the upstream saw {seen}, expected only the canary"
    )


def _send(proxy: PgproxyProcess, target: str) -> Response:
    with RawConnection(proxy.port()) as conn:
        conn.send(build_request("GET", target))
        return conn.read_response()


def test_valid_request_after_corpus_still_served(proxy: PgproxyProcess) -> None:
    """Keep-alive still works for well-formed requests on the same process."""
    with RawConnection(proxy.port()) as conn:
        for index in range(3):
            conn.send(build_request("GET", f"/fine/{index}"))
            assert echo_of(conn.read_response())["target"] == f"/fine/{index}"


@pytest.mark.parametrize("method", [b"FOO", b"get"], ids=["extension", "lowercase"])
def test_unknown_method_not_implemented(
    proxy: PgproxyProcess, upstream: Upstream, method: bytes
) -> None:
    """A method is a case-sensitive token (RFC 9110 section 9.1).

    `FOO` and `get` are well-formed tokens that pgproxy does not forward, so
    the response is 501 Not Implemented (RFC 9110 section 15.6.2), not a 400
    that calls a well-formed request malformed.
    """
    with RawConnection(proxy.port()) as conn:
        conn.send(method + b" /method HTTP/1.1\r\n" + H + b"\r\n")
        response = conn.read_response()
    assert response.status == 501, (
        f"{method.decode()} /method: expected 501, got:\n{response.describe()}"
    )
    assert upstream.requests == []


def test_bad_request_after_good_on_same_connection(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    """A malformed request pipelined after a good one ends the connection."""
    good = build_request("GET", "/good-first")
    bad = (
        b"POST /bad HTTP/1.1\r\n"
        + H
        + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    )
    with RawConnection(proxy.port()) as conn:
        conn.send(good + bad)
        assert echo_of(conn.read_response())["target"] == "/good-first"
        response = conn.read_response()
        assert response.status == 400, response.describe()
        assert (response.header("connection") or "").lower() == "close"
        assert conn.wait_closed(5) == b"", "pgproxy kept the connection after the 400"
    assert [r.target for r in upstream.requests] == ["/good-first"]
