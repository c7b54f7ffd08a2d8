"""Replies the proxy writes itself: error replies and fixed `respond` routes."""

from __future__ import annotations

import pytest

from pgproxy.graph.settings import RespondSettings
from pgproxy.proxy.respond import FixedResponse, error_body, error_response


def fixed(status: int, body: str = "", *headers: tuple[str, str]) -> FixedResponse:
    return FixedResponse(RespondSettings(status=status, body=body, headers=headers))


def head_fields(response: bytes) -> list[bytes]:
    head, _, _ = response.partition(b"\r\n\r\n")
    return [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]


@pytest.mark.parametrize("status", [204, 304])
def test_no_content_reply_ends_at_its_head(status: int) -> None:
    # RFC 9110 section 8.6: a 204 has no Content-Length; a 304's would have
    # to be the 200's. With keep-alive, any byte after the head would be read
    # as the start of the next response.
    response = fixed(status, "", ("x-a", "1")).render(close=False, head_only=False)
    assert response.endswith(b"\r\n\r\n"), response
    assert b"content-length" not in head_fields(response), response
    assert b"content-type" not in head_fields(response), response
    assert b"x-a" in head_fields(response)


def test_fixed_reply_has_length_and_body() -> None:
    response = fixed(200, "fixed").render(close=True, head_only=False)
    assert b"Content-Length: 5\r\n" in response
    assert b"Connection: close\r\n" in response
    assert response.endswith(b"\r\n\r\nfixed")


def test_fixed_reply_to_head_has_length_without_body() -> None:
    response = fixed(200, "fixed").render(close=False, head_only=True)
    assert b"Content-Length: 5\r\n" in response
    assert response.endswith(b"\r\n\r\n")


def test_error_body_is_what_error_response_sends() -> None:
    response = error_response(404, "no route matches", close=False)
    assert response.endswith(b"\r\n\r\n" + error_body("no route matches"))
    assert b"Content-Length: %d\r\n" % len(error_body("no route matches")) in response
