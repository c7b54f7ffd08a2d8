"""Access record formatting and the batched access line handler."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime, timezone

import pytest

from pgproxy.observability.access import (
    AccessLog,
    AccessRecord,
    format_combined,
    format_json,
    rfc3339,
)
from pgproxy.observability.logging import (
    ACCESS_LOGGER,
    PIPE_ATOMIC_BYTES,
    AccessLineHandler,
)

JSON_KEYS = [
    "time",
    "client",
    "listener",
    "method",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "route",
    "cluster",
    "endpoint",
    "attempts",
    "failure",
    "upstream_status",
]


def make_record(**changes: object) -> AccessRecord:
    record = AccessRecord(
        time=1_700_000_000.25,
        client="127.0.0.1:40000",
        listener="main",
        method="GET",
        path="/a?b=c",
        status=200,
        bytes_in=0,
        bytes_out=100,
        duration_ms=1.234,
        route="r",
        cluster="c",
        endpoint="127.0.0.1:8080",
        attempts=1,
        failure=None,
        upstream_status=200,
    )
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def test_json_line_has_every_field_in_order() -> None:
    parsed = json.loads(format_json(make_record()))
    assert list(parsed) == JSON_KEYS
    assert parsed == {
        "time": "2023-11-14T22:13:20.250Z",
        "client": "127.0.0.1:40000",
        "listener": "main",
        "method": "GET",
        "path": "/a?b=c",
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 100,
        "duration_ms": 1.234,
        "route": "r",
        "cluster": "c",
        "endpoint": "127.0.0.1:8080",
        "attempts": 1,
        "failure": None,
        "upstream_status": 200,
    }


@pytest.mark.parametrize(
    ("duration_ms", "text"),
    [(1.234, "1.234"), (12.5, "12.500"), (0.0, "0.000"), (0.0004, "0.000"),
     (999.9996, "1000.000"), (61234.007, "61234.007")],
)  # fmt: skip
def test_json_duration_has_three_decimals(duration_ms: float, text: str) -> None:
    line = format_json(make_record(duration_ms=duration_ms))
    assert f'"duration_ms":{text},' in line
    assert json.loads(line)["duration_ms"] == float(text)


def test_json_nulls_for_unrouted_request() -> None:
    line = format_json(
        make_record(
            route=None,
            cluster=None,
            endpoint=None,
            upstream_status=None,
            failure="no_route",
        )
    )
    parsed = json.loads(line)
    assert parsed["route"] is None
    assert parsed["cluster"] is None
    assert parsed["endpoint"] is None
    assert parsed["upstream_status"] is None
    assert parsed["failure"] == "no_route"


def test_json_escapes_hostile_path_and_method() -> None:
    # The path reaches the record as the latin-1 decoding of the raw bytes.
    raw_path = b'/q"x\\y\x01\x1f\x7f\r\n\t\xff\xc3(},"status":1'
    path = raw_path.decode("latin-1")
    method = 'GE"T\\'
    line = format_json(make_record(path=path, method=method))
    assert "\n" not in line
    assert "\r" not in line
    parsed = json.loads(line)
    assert parsed["path"] == path
    assert parsed["path"].encode("latin-1") == raw_path
    assert parsed["method"] == method
    assert parsed["status"] == 200
    assert list(parsed) == JSON_KEYS
    line.encode("ascii")  # non-ASCII is escaped, so any sink can take the line


def test_rfc3339_milliseconds_and_second_cache() -> None:
    base = 1_700_000_000
    # Fractions exact in binary, so truncation to milliseconds is exact too.
    assert rfc3339(base + 0.875) == "2023-11-14T22:13:20.875Z"
    # Same second again, then the next one: the cached second must move on.
    assert rfc3339(base + 0.125) == "2023-11-14T22:13:20.125Z"
    assert rfc3339(base + 1.5) == "2023-11-14T22:13:21.500Z"
    assert rfc3339(base + 0.5) == "2023-11-14T22:13:20.500Z"
    parsed = datetime.fromisoformat(rfc3339(base).replace("Z", "+00:00"))
    assert parsed == datetime.fromtimestamp(base, timezone.utc)


def test_combined_line_quotes_header_values() -> None:
    line = format_combined(
        make_record(referer='http://x/"y', user_agent="a\\b", version="1.0")
    )
    assert line.startswith('127.0.0.1 - - [14/Nov/2023:22:13:20 +0000] "GET /a?b=c ')
    assert 'HTTP/1.0" 200 100 "http://x/\\"y" "a\\\\b" route="r"' in line


@pytest.fixture
def access_stream() -> Iterator[io.StringIO]:
    """Install an AccessLineHandler on the access logger, as setup_logging does."""
    access = logging.getLogger(ACCESS_LOGGER)
    saved = (list(access.handlers), access.level, access.propagate)
    stream = io.StringIO()
    for old in saved[0]:
        access.removeHandler(old)
    handler = AccessLineHandler(stream)
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    yield stream
    handler.flush()
    access.removeHandler(handler)
    for old in saved[0]:
        access.addHandler(old)
    access.setLevel(saved[1])
    access.propagate = saved[2]


def test_handler_writes_at_once_without_loop(access_stream: io.StringIO) -> None:
    AccessLog("json").write(make_record(path="/one"))
    assert json.loads(access_stream.getvalue())["path"] == "/one"


def test_handler_batches_lines_per_iteration(
    access_stream: io.StringIO,
) -> None:
    log = AccessLog("json")

    async def main() -> tuple[str, str]:
        for index in range(3):
            log.write(make_record(path=f"/{index}"))
        before = access_stream.getvalue()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        # The writer thread writes what the iteration handed it.
        assert logging.getLogger(ACCESS_LOGGER).handlers[0].wait_written(5.0)
        return before, access_stream.getvalue()

    before, after = asyncio.run(main())
    assert before == ""
    paths = [json.loads(line)["path"] for line in after.splitlines()]
    assert paths == ["/0", "/1", "/2"]


def test_handler_keeps_lines_after_loop_stops(access_stream: io.StringIO) -> None:
    log = AccessLog("json")
    loop = asyncio.new_event_loop()
    try:
        # The flush callback is queued but the loop stops before running it.
        loop.call_soon(log.write, make_record(path="/last"))
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()
    assert access_stream.getvalue() == ""
    # Shutdown flushes every handler; so does the next write outside a loop.
    logging.getLogger(ACCESS_LOGGER).handlers[0].flush()
    assert json.loads(access_stream.getvalue())["path"] == "/last"


def test_handler_flushes_on_next_loop(access_stream: io.StringIO) -> None:
    """A flush left scheduled on a stopped loop does not hold later lines."""
    log = AccessLog("json")
    loop = asyncio.new_event_loop()
    try:
        loop.call_soon(log.write, make_record(path="/first"))
        loop.call_soon(loop.stop)
        loop.run_forever()
    finally:
        loop.close()

    async def main() -> str:
        log.write(make_record(path="/second"))
        await asyncio.sleep(0)
        assert logging.getLogger(ACCESS_LOGGER).handlers[0].wait_written(5.0)
        return access_stream.getvalue()

    paths = [json.loads(line)["path"] for line in asyncio.run(main()).splitlines()]
    assert paths == ["/first", "/second"]


def test_handler_writes_full_buffer_at_once(access_stream: io.StringIO) -> None:
    log = AccessLog("json")

    async def main() -> int:
        for index in range(600):
            log.write(make_record(path=f"/{index}"))
        assert logging.getLogger(ACCESS_LOGGER).handlers[0].wait_written(5.0)
        return len(access_stream.getvalue().splitlines())

    written = asyncio.run(main())
    assert 512 <= written < 600
    logging.getLogger(ACCESS_LOGGER).handlers[0].flush()
    assert len(access_stream.getvalue().splitlines()) == 600


def test_access_log_uses_other_handlers(caplog: pytest.LogCaptureFixture) -> None:
    access = logging.getLogger(ACCESS_LOGGER)
    saved = access.propagate
    access.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
            AccessLog("json").write(make_record(path="/caught"))
    finally:
        access.propagate = saved
    assert any('"path":"/caught"' in r.getMessage() for r in caplog.records)


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def only_access_handler() -> Iterator[None]:
    """Detach the handlers pytest adds to non-propagating loggers for a while."""
    access = logging.getLogger(ACCESS_LOGGER)
    others = [h for h in access.handlers if type(h) is not AccessLineHandler]
    for handler in others:
        access.removeHandler(handler)
    try:
        yield
    finally:
        for handler in others:
            access.addHandler(handler)


def test_access_log_sees_handlers_added_later(access_stream: io.StringIO) -> None:
    log = AccessLog("json")
    extra = ListHandler()
    access = logging.getLogger(ACCESS_LOGGER)
    with only_access_handler():
        log.write(make_record(path="/alone"))
        assert log._batch is not None  # the line took the direct path
        access.addHandler(extra)
        try:
            log.write(make_record(path="/both"))
        finally:
            access.removeHandler(extra)
        log.write(make_record(path="/alone-again"))
    paths = [json.loads(line)["path"] for line in access_stream.getvalue().splitlines()]
    assert paths == ["/alone", "/both", "/alone-again"]
    assert [json.loads(line)["path"] for line in extra.messages] == ["/both"]


def test_access_log_level_checked_per_iteration(
    access_stream: io.StringIO,
) -> None:
    log = AccessLog("json")
    access = logging.getLogger(ACCESS_LOGGER)

    async def main() -> tuple[bool, bool]:
        log.write(make_record(path="/queued"))
        access.setLevel(logging.WARNING)
        during = log.enabled
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return during, log.enabled

    assert log.enabled
    with only_access_handler():
        during, after = asyncio.run(main())
    # A batch queued in the iteration keeps `enabled` True until its flush.
    assert during
    assert not after


class RecordingStream(io.StringIO):
    """A stream that records the text of each flush, as one write(2) each."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self._flushed = 0

    def flush(self) -> None:
        text = self.getvalue()
        self.writes.append(text[self._flushed :])
        self._flushed = len(text)


@pytest.mark.parametrize("long_line", ["é" * 3000, "x" * 5000])
def test_handler_writes_stay_within_pipe_buf(long_line: str) -> None:
    stream = RecordingStream()
    handler = AccessLineHandler(stream)
    lines = [
        format_json(make_record(path=f"/{index}" + "x" * 200)) for index in range(60)
    ]
    # One line longer than PIPE_BUF goes out alone, amid the others.
    lines.insert(30, long_line)
    for line in lines:
        handler.write_line(line)
    handler.flush()
    writes = [text for text in stream.writes if text]
    assert len(writes) > 1
    for text in writes:
        assert text.endswith("\n")
        assert len(text.encode()) <= PIPE_ATOMIC_BYTES or text.count("\n") == 1
    assert "".join(writes).splitlines() == lines


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError("stdout closed")


def test_handler_survives_broken_stream(caplog: pytest.LogCaptureFixture) -> None:
    handler = AccessLineHandler(BrokenStream())
    with caplog.at_level(logging.ERROR):
        handler.write_line("one")
        handler.write_line("two")
    errors = [r for r in caplog.records if "cannot write access log" in r.getMessage()]
    assert len(errors) == 1


@pytest.mark.timeout(60)
def test_unread_stdout_drops_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    read_fd, write_fd = os.pipe()
    stream = open(write_fd, "w", encoding="utf-8")
    handler = AccessLineHandler(stream)
    line = "x" * 200
    count = 3000

    async def main() -> None:
        # One flush per iteration: far more than the pipe and the writer
        # thread's queue hold while the pipe is not read.
        for _ in range(count):
            handler.write_line(line)
            await asyncio.sleep(0)

    try:
        with caplog.at_level(logging.WARNING):
            asyncio.run(main())  # blocked forever if the loop wrote itself
        assert handler.dropped_lines > 0
        warned = [r for r in caplog.records if "not being read" in r.getMessage()]
        assert warned
        received = b""
        while not handler.wait_written(0.05):
            received += os.read(read_fd, 1 << 16)
        stream.flush()
        os.set_blocking(read_fd, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_fd, 1 << 16):
                received += chunk
        lines = received.decode().splitlines()
        assert set(lines) == {line}
        assert len(lines) + handler.dropped_lines == count
    finally:
        with caplog.at_level(logging.WARNING):
            handler.close()  # its last drop report goes to caplog, not stderr
        stream.close()
        os.close(read_fd)


@pytest.mark.timeout(60)
def test_exit_waits_for_an_unread_stdout_only_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("pgproxy.observability.logging.DRAIN_TIMEOUT", 0.05)
    read_fd, write_fd = os.pipe()
    stream = open(write_fd, "w", encoding="utf-8")
    handler = AccessLineHandler(stream)
    waits: list[bool] = []
    wait_written = handler.wait_written

    def recorded_wait(timeout: float) -> bool:
        waits.append(wait_written(timeout))
        return waits[-1]

    def read_all() -> bytes:
        received = b""
        while not wait_written(0.05):
            received += os.read(read_fd, 1 << 16)
        stream.flush()
        os.set_blocking(read_fd, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_fd, 1 << 16):
                received += chunk
        os.set_blocking(read_fd, True)
        return received

    monkeypatch.setattr(handler, "wait_written", recorded_wait)
    big = "x" * (1 << 20)  # far more than a pipe holds: the writer blocks
    received = b""
    try:
        with caplog.at_level(logging.WARNING):
            handler.write_line(big)
            handler.flush()
            handler.write_line("more")
            handler.close()
        # Exit runs a flush and then a close: one timed-out wait, not four.
        assert waits == [False]
        received = read_all()
        handler.write_line("after")  # the reader is back: this one waits again
        assert waits[-1] is True
        received += read_all()
        assert received.decode().splitlines() == [big, "more", "after"]
    finally:
        read_all()  # unblocks the writer thread, which holds the stream's lock
        stream.close()
        os.close(read_fd)
