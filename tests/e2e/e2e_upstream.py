"""In-process upstream servers with programmable behaviour, for end-to-end tests.

`Upstream` is a threaded HTTP/1.1 server on 127.0.0.1 port 0 written on raw
sockets, so a test can make it misbehave in ways a real framework would not
allow: cut a body short, respond with garbage, hang, or close right after accept.
It records every connection it accepts, every byte it receives and every
request head it parses (recorded as soon as the head arrives, before the
body), which is what lets a test assert that the upstream saw nothing.

A handler is called once per request with the parsed request and the
connection; it writes the response itself and returns False to close the
connection afterwards. The functions at the end of this module build the
handlers the tests use.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

Handler = Callable[["ReceivedRequest", "UpstreamConnection"], "bool | None"]
UpstreamFactory = Callable[..., "Upstream"]

_POLL_SECONDS = 0.2
_MAX_STORED_BODY = 1024 * 1024
_PATTERN = bytes(range(256)) * 4096  # 1 MiB of a known byte pattern


def pattern_bytes(size: int) -> bytes:
    """Return `size` bytes of the deterministic pattern the big-body handlers send."""
    repeats = size // len(_PATTERN) + 1
    return (_PATTERN * repeats)[:size]


@dataclass
class ReceivedRequest:
    """A request as the upstream received it; body fields fill in after the head."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    connection_id: int
    body: bytes = b""
    body_length: int = 0
    body_sha256: str = hashlib.sha256(b"").hexdigest()
    body_chunked: bool = False
    body_complete: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """Return the first value of header `name` (case-insensitive), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        """Return every value of header `name` in received order."""
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    @property
    def path(self) -> str:
        """The request-target without its query string."""
        return self.target.split("?", 1)[0]

    def wants_close(self) -> bool:
        """Return True when the request requests closing the connection after it."""
        tokens = {
            token.strip().lower()
            for value in self.header_all("connection")
            for token in value.split(",")
        }
        if self.version == "HTTP/1.0":
            return "keep-alive" not in tokens
        return "close" in tokens

    def as_json(self, upstream: str) -> dict[str, object]:
        """Return the echo document sent back by the `echo` handler."""
        return {
            "upstream": upstream,
            "connection_id": self.connection_id,
            "method": self.method,
            "target": self.target,
            "version": self.version,
            "headers": [[name, value] for name, value in self.headers],
            "body": self.body.decode("latin-1") if self.body_length <= 65536 else None,
            "body_length": self.body_length,
            "body_sha256": self.body_sha256,
            "body_chunked": self.body_chunked,
            "trailers": [[name, value] for name, value in self.trailers],
        }


class UpstreamConnection:
    """One accepted connection: a receive buffer plus send and close."""

    def __init__(
        self, server: Upstream, sock: socket.socket, connection_id: int
    ) -> None:
        self.server = server
        self.sock = sock
        self.connection_id = connection_id
        self.buffer = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        """Send all of `data`; a peer that went away is ignored."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def close(self) -> None:
        """Close the connection."""
        self.closed = True
        self.sock.close()

    def _recv(self, deadline: float | None) -> bool:
        """Receive into the buffer; return False on EOF, stop or deadline."""
        while not self.server.stopping.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            try:
                readable, _, _ = select.select([self.sock], [], [], _POLL_SECONDS)
            except (OSError, ValueError):
                return False
            if not readable:
                continue
            try:
                data = self.sock.recv(262144)
            except OSError:
                return False
            if not data:
                return False
            self.server.count_bytes(len(data))
            self.buffer += data
            return True
        return False

    def read_until(self, marker: bytes, deadline: float | None = None) -> bytes | None:
        """Return bytes up to and including `marker`, or None if the peer left."""
        while marker not in self.buffer:
            if not self._recv(deadline):
                return None
        index = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:index], self.buffer[index:]
        return data

    def read_some(self, limit: int) -> bytes | None:
        """Return up to `limit` buffered or newly received bytes, None at EOF."""
        if not self.buffer and not self._recv(None):
            return None
        data, self.buffer = self.buffer[:limit], self.buffer[limit:]
        return data

    def iter_body(self, request: ReceivedRequest) -> Iterator[bytes]:
        """Yield the request body as it arrives, de-chunking when needed."""
        if request.body_chunked:
            yield from self._iter_chunked(request)
            return
        remaining = int(request.header("content-length") or 0)
        while remaining > 0:
            data = self.read_some(min(remaining, 65536))
            if data is None:
                return
            remaining -= len(data)
            yield data
        request.body_complete = True

    def _iter_chunked(self, request: ReceivedRequest) -> Iterator[bytes]:
        while True:
            line = self.read_until(b"\r\n")
            if line is None:
                return
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                break
            remaining = size
            while remaining > 0:
                data = self.read_some(min(remaining, 65536))
                if data is None:
                    return
                remaining -= len(data)
                yield data
            if self.read_until(b"\r\n") is None:
                return
        while True:
            line = self.read_until(b"\r\n")
            if line is None or line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            request.trailers.append((name.strip(), value.strip()))
        request.body_complete = True

    def read_body(self, request: ReceivedRequest) -> None:
        """Read the whole body into `request`, keeping at most 1 MiB of it."""
        digest = hashlib.sha256()
        stored = bytearray()
        for data in self.iter_body(request):
            digest.update(data)
            request.body_length += len(data)
            if len(stored) < _MAX_STORED_BODY:
                stored += data[: _MAX_STORED_BODY - len(stored)]
        request.body = bytes(stored)
        request.body_sha256 = digest.hexdigest()

    def wait_peer_close(self, timeout: float = 30.0) -> None:
        """Block until the peer closes, the server stops, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while self._recv(deadline):
            self.buffer = b""


class Upstream:
    """A programmable HTTP/1.1 upstream server on 127.0.0.1, port chosen by the OS.

    `on_accept` decides what happens to a new connection: "serve" (parse
    requests and call `handler`), "close" (close at once), "hang" (accept,
    read nothing, answer nothing) or "garbage" (send non-HTTP bytes, close).
    """

    def __init__(self, name: str, rcvbuf: int | None = None) -> None:
        self.name = name
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:
            # Inherited by accepted sockets; set before listen for the window scale.
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port: int = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.handler: Handler = echo
        self.on_accept = "serve"
        self.healthz_status = 200
        self.connections_accepted = 0
        self.requests: list[ReceivedRequest] = []
        self.bytes_received = 0
        self.errors: list[str] = []
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"upstream-{name}", daemon=True
        )
        self._accept_thread.start()

    def __repr__(self) -> str:
        return (
            f"<Upstream {self.name} {self.address} connections="
            f"{self.connections_accepted} requests={len(self.requests)}>"
        )

    def reset(self) -> None:
        """Restore the default behaviour and forget what was recorded."""
        with self.lock:
            self.handler = echo
            self.on_accept = "serve"
            self.healthz_status = 200
            self.connections_accepted = 0
            self.requests = []
            self.bytes_received = 0
            self.errors = []

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed by either side."""
        with self.lock:
            return len(self._sockets)

    def count_bytes(self, count: int) -> None:
        """Add `count` to the received-bytes total."""
        with self.lock:
            self.bytes_received += count

    def requests_to(self, path_prefix: str) -> list[ReceivedRequest]:
        """Return the recorded requests whose target starts with `path_prefix`."""
        with self.lock:
            return [r for r in self.requests if r.target.startswith(path_prefix)]

    def wait_for_requests(
        self, count: int, timeout: float = 5.0
    ) -> list[ReceivedRequest]:
        """Wait until at least `count` requests were recorded; return them all."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"upstream {self.name} recorded {len(self.requests)} "
                        f"requests, expected at least {count} within {timeout}s"
                    )
                self.changed.wait(remaining)
            return list(self.requests)

    def stop(self) -> None:
        """Stop accepting, close every connection and join the threads."""
        self.stopping.set()
        self.listener.close()
        with self.lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._accept_thread.join(5)
        for thread in self._threads:
            thread.join(5)

    def _accept_loop(self) -> None:
        connection_id = 0
        while not self.stopping.is_set():
            try:
                readable, _, _ = select.select([self.listener], [], [], _POLL_SECONDS)
                if not readable:
                    continue
                sock, _ = self.listener.accept()
            except OSError:
                return
            connection_id += 1
            with self.changed:
                self.connections_accepted += 1
                self._sockets.add(sock)
                mode = self.on_accept
                self.changed.notify_all()
            thread = threading.Thread(
                target=self._run_connection,
                args=(sock, connection_id, mode),
                name=f"upstream-{self.name}-{connection_id}",
                daemon=True,
            )
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def _run_connection(
        self, sock: socket.socket, connection_id: int, mode: str
    ) -> None:
        conn = UpstreamConnection(self, sock, connection_id)
        try:
            if mode == "serve":
                self._serve(conn)
            elif mode == "hang":
                conn.wait_peer_close()
            elif mode == "garbage":
                conn.send(b"\x00\x01 this is not HTTP \xff\r\n\r\n")
        except Exception as exc:
            with self.lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            with self.lock:
                self._sockets.discard(sock)
            sock.close()

    def _serve(self, conn: UpstreamConnection) -> None:
        while not conn.closed:
            head = conn.read_until(b"\r\n\r\n")
            if head is None:
                return
            request = parse_request_head(head, conn.connection_id)
            with self.changed:
                self.requests.append(request)
                handler = self.handler
                if request.path == "/healthz":
                    handler = fixed(self.healthz_status, b"healthz\n")
                self.changed.notify_all()
            if not getattr(handler, "stream_body", False):
                conn.read_body(request)
            keep_open = handler(request, conn)
            if keep_open is False or request.wants_close() or conn.closed:
                return


def parse_request_head(raw: bytes, connection_id: int) -> ReceivedRequest:
    """Parse a request line and header block ending in CRLF CRLF."""
    lines = raw.decode("latin-1").split("\r\n")
    method, target, version = [*lines[0].split(" ", 2), "", ""][:3]
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip(" \t")))
    request = ReceivedRequest(method, target, version, headers, connection_id)
    coding = (request.header("transfer-encoding") or "").lower()
    request.body_chunked = coding.endswith("chunked")
    return request


def response_bytes(
    status: int,
    body: bytes = b"",
    headers: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
    reason: str = "Test",
    content_length: bool = True,
) -> bytes:
    """Serialise a response, adding Content-Length when `content_length` is set."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    names = {name.lower() for name, _ in headers}
    if (
        content_length
        and "content-length" not in names
        and "transfer-encoding" not in names
    ):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# Handlers. Each returns False to close the connection after the response.


def echo(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
    """Respond 200 with the request as JSON (see `ReceivedRequest.as_json`)."""
    body = json.dumps(request.as_json(conn.server.name)).encode()
    headers = [("Content-Type", "application/json"), ("X-Upstream", conn.server.name)]
    conn.send(response_bytes(200, body, headers, reason="OK"))
    return None


def fixed(
    status: int,
    body: bytes = b"",
    headers: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
    close: bool = False,
) -> Handler:
    """Build a handler answering a fixed response."""

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        all_headers = [*headers, ("X-Upstream", conn.server.name)]
        if close:
            all_headers.append(("Connection", "close"))
        no_body = request.method == "HEAD" or status in (204, 304)
        data = response_bytes(
            status, body, all_headers, content_length=status not in (204, 304)
        )
        if no_body:
            data = data[: len(data) - len(body)]
        conn.send(data)
        return False if close else None

    return handle


def raw(data: bytes, close: bool = False) -> Handler:
    """Build a handler sending `data` verbatim as the response."""

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        conn.send(data)
        return False if close else None

    return handle


def chunked(
    pieces: list[bytes],
    trailers: list[tuple[str, str]] | None = None,
    gate: threading.Event | None = None,
) -> Handler:
    """Build a handler sending `pieces` as chunks, pausing on `gate` after the first."""

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        head = [("Transfer-Encoding", "chunked"), ("X-Upstream", conn.server.name)]
        conn.send(response_bytes(200, b"", head, reason="OK"))
        for index, piece in enumerate(pieces):
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            if index == 0 and gate is not None:
                gate.wait(10)
        tail = "".join(f"{name}: {value}\r\n" for name, value in trailers or [])
        conn.send(b"0\r\n" + tail.encode() + b"\r\n")
        return None

    return handle


def big_body(size: int, use_chunked: bool = False) -> Handler:
    """Build a handler sending `size` pattern bytes, by Content-Length or chunked."""

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        data = pattern_bytes(size)
        if use_chunked:
            conn.send(
                response_bytes(
                    200, b"", [("Transfer-Encoding", "chunked")], reason="OK"
                )
            )
            for start in range(0, size, 65536):
                piece = data[start : start + 65536]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            conn.send(
                response_bytes(200, b"", [("Content-Length", str(size))], reason="OK")
            )
            view = memoryview(data)
            for start in range(0, size, 262144):
                conn.send(bytes(view[start : start + 262144]))
        return None

    return handle


def truncated_length(declared: int, sent: int) -> Handler:
    """Build a handler declaring `declared` body bytes, sending `sent`, then closing."""

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        conn.send(
            response_bytes(200, b"", [("Content-Length", str(declared))], reason="OK")
        )
        conn.send(pattern_bytes(sent))
        time.sleep(0.05)
        return False

    return handle


def truncated_chunked(pieces: list[bytes]) -> Handler:
    """Build a handler sending chunks without the last (zero) chunk, then closing."""

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        conn.send(
            response_bytes(200, b"", [("Transfer-Encoding", "chunked")], reason="OK")
        )
        for piece in pieces:
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        time.sleep(0.05)
        return False

    return handle


def hang(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
    """Read the request and never answer, until the peer closes."""
    conn.wait_peer_close()
    return False


def close_after_request(
    request: ReceivedRequest, conn: UpstreamConnection
) -> bool | None:
    """Read the whole request, then close without answering."""
    return False


def close_later(seconds: float, inner: Handler = echo) -> Handler:
    """Build a handler that runs `inner` (keep-alive), then closes after `seconds`.

    The response does not announce the close, as a server whose keep-alive
    timeout expires would not.
    """

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        inner(request, conn)
        time.sleep(seconds)
        return False

    return handle


def delayed(seconds: float, inner: Handler) -> Handler:
    """Build a handler that waits `seconds` before running `inner`."""

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        time.sleep(seconds)
        return inner(request, conn)

    return handle


def gated(gate: threading.Event, inner: Handler, timeout: float = 15.0) -> Handler:
    """Build a handler that waits for `gate` (bounded) before running `inner`."""

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        gate.wait(timeout)
        return inner(request, conn)

    return handle


def by_path(routes: dict[str, Handler], default: Handler = echo) -> Handler:
    """Build a handler choosing by the longest matching path prefix."""

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        for prefix in sorted(routes, key=len, reverse=True):
            if request.target.startswith(prefix):
                return routes[prefix](request, conn)
        return default(request, conn)

    handle.stream_body = any(  # type: ignore[attr-defined]
        getattr(h, "stream_body", False) for h in routes.values()
    )
    return handle


def slow_sink(delay: float) -> Handler:
    """Build a handler that waits `delay` before reading the body, then echoes it."""

    def handle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        time.sleep(delay)
        conn.read_body(request)
        return echo(request, conn)

    handle.stream_body = True  # type: ignore[attr-defined]
    return handle


class WebSocketUpstream:
    """A WebSocket echo server (the `websockets` package) on 127.0.0.1 port 0."""

    def __init__(self) -> None:
        from websockets.sync.server import serve

        self.paths: list[str] = []
        self.server = serve(self._echo, "127.0.0.1", 0)
        self.port: int = self.server.socket.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _echo(self, websocket: object) -> None:
        from websockets.exceptions import ConnectionClosed

        self.paths.append(websocket.request.path)  # type: ignore[attr-defined]
        try:
            for message in websocket:  # type: ignore[attr-defined]
                websocket.send(message)  # type: ignore[attr-defined]
        except ConnectionClosed:
            pass

    def stop(self) -> None:
        """Stop the server and join its thread."""
        self.server.shutdown()
        self.thread.join(5)
        self.server.socket.close()
