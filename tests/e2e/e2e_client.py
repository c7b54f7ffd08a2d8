"""A raw-socket HTTP/1.1 client for end-to-end tests.

It sends exactly the bytes a test gives it and parses the response without
normalising anything. Tests therefore get pgproxy's real framing: interim
1xx responses, Content-Length, chunked (with extensions and trailers) and
close-delimited bodies, and whether a response ended early. Every read has a
deadline, so a proxy that stalls fails the test instead of hanging it.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TIMEOUT = 5.0


class IncompleteResponse(AssertionError):
    """The connection ended, or the deadline passed, before a response was whole."""

    def __init__(self, message: str, partial: bytes) -> None:
        super().__init__(f"{message}; received {len(partial)} bytes: {partial[:300]!r}")
        self.partial = partial


@dataclass
class Response:
    """One parsed response; `complete` is false when its body was cut short."""

    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool = True
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)
    interim: list[Response] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """Return the first value of header `name` (case-insensitive), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        """Return every value of header `name` in received order."""
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    def header_names(self) -> set[str]:
        """Return the lower-cased names of all response headers."""
        return {key.lower() for key, _ in self.headers}

    def describe(self) -> str:
        """Return a short text form for assertion messages."""
        head = "\n".join(f"{k}: {v}" for k, v in self.headers)
        return (
            f"{self.version} {self.status} {self.reason}\n{head}\n\n{self.body[:300]!r}"
        )


class RawConnection:
    """One client TCP connection to pgproxy with a receive buffer."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = DEFAULT_TIMEOUT,
        rcvbuf: int | None = None,
        mss: int | None = None,
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Set before connect so the window scale matches the small buffer.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if mss is not None:
            # Linux sizes the peer's send buffer from the MSS this side
            # announces, up to net.ipv4.tcp_wmem's maximum (4 MiB by default)
            # on loopback. A small MSS keeps most of an unread response in
            # pgproxy's own write buffer instead.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect((host, port))
        except OSError:
            self.sock.close()
            raise
        self.timeout = timeout
        self.buffer = b""
        self.eof = False

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def local_port(self) -> int:
        """The client's own port, as logged in the access record's `client` field."""
        port: int = self.sock.getsockname()[1]
        return port

    def close(self) -> None:
        """Close the socket; safe to call twice."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send all of `data`."""
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Receive more bytes into the buffer; return False on EOF or reset."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            raise
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def _read_until(self, marker: bytes, deadline: float) -> bytes | None:
        while marker not in self.buffer:
            if not self._fill(deadline):
                return None
        index = self.buffer.index(marker) + len(marker)
        chunk, self.buffer = self.buffer[:index], self.buffer[index:]
        return chunk

    def _read_exact(self, count: int, deadline: float) -> bytes | None:
        while len(self.buffer) < count:
            if not self._fill(deadline):
                return None
        chunk, self.buffer = self.buffer[:count], self.buffer[count:]
        return chunk

    def read_head(self, timeout: float | None = None) -> Response:
        """Read one status line and header block (an interim or final head)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            raw = self._read_until(b"\r\n\r\n", deadline)
        except TimeoutError:
            raise IncompleteResponse(
                "timed out waiting for a response head", self.buffer
            ) from None
        if raw is None:
            raise IncompleteResponse(
                "connection closed before a response head", self.buffer
            )
        return parse_head(raw)

    def read_response(
        self,
        method: str = "GET",
        timeout: float | None = None,
        allow_incomplete: bool = False,
    ) -> Response:
        """Read interim responses, then one final response with its body.

        Raises IncompleteResponse when the body ends early, unless
        `allow_incomplete` is set, in which case the response is returned
        with `complete=False`.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        interim: list[Response] = []
        while True:
            head = self.read_head(max(deadline - time.monotonic(), 0.01))
            if 100 <= head.status < 200 and head.status != 101:
                interim.append(head)
                continue
            break
        head.interim = interim
        try:
            self._read_body(head, method, deadline)
        except TimeoutError:
            head.complete = False
        if not head.complete and not allow_incomplete:
            raise IncompleteResponse(
                f"response {head.status} body incomplete", head.body + self.buffer
            )
        return head

    def _read_body(self, head: Response, method: str, deadline: float) -> None:
        if method == "HEAD" or head.status in (101, 204, 304):
            return
        transfer_coding = (head.header("transfer-encoding") or "").lower()
        if transfer_coding:
            head.chunked = transfer_coding.split(",")[-1].strip() == "chunked"
        if head.chunked:
            self._read_chunked(head, deadline)
            return
        length = head.header("content-length")
        if length is not None:
            data = self._read_exact(int(length), deadline)
            if data is None:
                head.body, self.buffer = self.buffer, b""
                head.complete = False
            else:
                head.body = data
            return
        while self._fill(deadline):
            pass
        head.body, self.buffer = self.buffer, b""

    def _read_chunked(self, head: Response, deadline: float) -> None:
        body = bytearray()
        head.complete = False
        while True:
            line = self._read_until(b"\r\n", deadline)
            if line is None:
                break
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                trailers = self._read_trailers(deadline)
                head.complete = trailers is not None
                head.trailers = trailers or []
                break
            data = self._read_exact(size + 2, deadline)
            if data is None:
                body += self.buffer
                self.buffer = b""
                break
            body += data[:-2]
        head.body = bytes(body)

    def _read_trailers(self, deadline: float) -> list[tuple[str, str]] | None:
        trailers: list[tuple[str, str]] = []
        while True:
            line = self._read_until(b"\r\n", deadline)
            if line is None:
                return None
            if line == b"\r\n":
                return trailers
            name, _, value = line.decode("latin-1").partition(":")
            trailers.append((name, value.strip()))

    def drain_digest(
        self,
        length: int,
        timeout: float = 30.0,
        piece: int = 262144,
        pause: float = 0.0,
    ) -> tuple[int, str]:
        """Receive `length` body bytes without keeping them; return (count, sha256).

        Each receive takes at most `piece` bytes and is followed by a sleep
        of `pause` seconds, which makes a slow reader.
        """
        deadline = time.monotonic() + timeout
        digest = hashlib.sha256()
        taken = self.buffer[:length]
        self.buffer = self.buffer[length:]
        digest.update(taken)
        count = len(taken)
        while count < length:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(min(piece, length - count))
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            digest.update(data)
            count += len(data)
            if pause:
                time.sleep(pause)
        return count, digest.hexdigest()

    def wait_for_bytes(self, marker: bytes, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """Receive until `marker` is in the buffer; False on EOF or timeout."""
        deadline = time.monotonic() + timeout
        try:
            while marker not in self.buffer:
                if not self._fill(deadline):
                    return False
        except TimeoutError:
            return False
        return True

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> bytes | None:
        """Wait for the peer to close; return the bytes received meanwhile.

        Returns None when the connection is still open after `timeout`.
        """
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return None
        extra, self.buffer = self.buffer, b""
        return extra

    def is_open_after(self, seconds: float) -> bool:
        """Return True when the peer has neither closed nor sent data for `seconds`."""
        if self.eof:
            return False
        try:
            self._fill(time.monotonic() + seconds)
        except TimeoutError:
            return True
        return False


def parse_head(raw: bytes) -> Response:
    """Parse a status line and header block ending in CRLF CRLF."""
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status_text, _, reason = rest.partition(" ")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.append((name, value.strip(" \t")))
    return Response(
        version=version,
        status=int(status_text),
        reason=reason,
        headers=headers,
        body=b"",
    )


def build_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    host: str | None = "test.local",
    version: str = "HTTP/1.1",
) -> bytes:
    """Serialise a well-formed request; Content-Length is added for a body."""
    lines = [f"{method} {target} {version}"]
    names = {name.lower() for name, _ in headers or []}
    if host is not None and "host" not in names:
        lines.append(f"Host: {host}")
    lines.extend(f"{name}: {value}" for name, value in headers or [])
    if (
        body is not None
        and "content-length" not in names
        and "transfer-encoding" not in names
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def request(
    port: int,
    method: str = "GET",
    target: str = "/",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    host: str | None = "test.local",
    timeout: float = DEFAULT_TIMEOUT,
) -> Response:
    """Send one request on a new connection and return the complete response."""
    with RawConnection(port, timeout=timeout) as conn:
        conn.send(build_request(method, target, headers, body, host))
        return conn.read_response(method)


def chunk(data: bytes) -> bytes:
    """Encode `data` as one chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def echo_of(response: Response) -> dict[str, Any]:
    """Decode the JSON document the upstream `echo` handler returned."""
    assert response.status == 200, (
        f"expected 200 from the echo upstream, got:\n{response.describe()}"
    )
    document: dict[str, Any] = json.loads(response.body)
    return document


def echoed_header(document: dict[str, Any], name: str) -> list[str]:
    """Return every value of request header `name` the upstream received."""
    lowered = name.lower()
    return [value for key, value in document["headers"] if key.lower() == lowered]
