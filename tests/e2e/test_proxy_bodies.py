"""Large bodies through a real pgproxy process: integrity and bounded memory.

10 MiB bodies go both ways with Content-Length and chunked framing and must
arrive byte for byte. The memory test runs its own pgproxy process, makes
the receiving peer slow, and checks that pgproxy's peak resident set size
grows far less than the body size, which only a proxy that streams with
backpressure can do.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import pytest
from e2e_client import RawConnection, build_request, echo_of, request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import (
    Upstream,
    UpstreamFactory,
    big_body,
    by_path,
    pattern_bytes,
    slow_sink,
)

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
path_prefix = "/"
cluster = "a"
timeout = "60s"

[clusters.a]
endpoints = ["{a}"]
response_header_timeout = "30s"
"""

TEN_MIB = 10 * 1024 * 1024
TEN_MIB_SHA256 = hashlib.sha256(pattern_bytes(TEN_MIB)).hexdigest()


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


def chunked_body(data: bytes, piece: int = 65536) -> bytes:
    parts = [
        f"{len(data[i : i + piece]):x}\r\n".encode() + data[i : i + piece] + b"\r\n"
        for i in range(0, len(data), piece)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def test_upload_10mib_content_length(proxy: PgproxyProcess) -> None:
    with RawConnection(proxy.port(), timeout=30) as conn:
        conn.send(build_request("PUT", "/upload-cl", body=pattern_bytes(TEN_MIB)))
        document = echo_of(conn.read_response(timeout=30))
    assert document["body_length"] == TEN_MIB
    assert document["body_sha256"] == TEN_MIB_SHA256, (
        "the uploaded body changed on the way"
    )


def test_upload_10mib_chunked(proxy: PgproxyProcess) -> None:
    head = build_request(
        "PUT", "/upload-chunked", headers=[("Transfer-Encoding", "chunked")]
    )
    with RawConnection(proxy.port(), timeout=30) as conn:
        conn.send(head + chunked_body(pattern_bytes(TEN_MIB)))
        document = echo_of(conn.read_response(timeout=30))
    assert document["body_length"] == TEN_MIB
    assert document["body_sha256"] == TEN_MIB_SHA256, (
        "the uploaded body changed on the way"
    )


@pytest.mark.parametrize(
    "use_chunked", [False, True], ids=["content-length", "chunked"]
)
def test_download_10mib(
    proxy: PgproxyProcess, upstream: Upstream, use_chunked: bool
) -> None:
    upstream.handler = big_body(TEN_MIB, use_chunked=use_chunked)
    with RawConnection(proxy.port(), timeout=30) as conn:
        conn.send(build_request("GET", "/download"))
        response = conn.read_response(timeout=30)
    assert response.status == 200, response.describe()
    assert len(response.body) == TEN_MIB
    assert hashlib.sha256(response.body).hexdigest() == TEN_MIB_SHA256, (
        "the body changed on the way"
    )


MEMORY_BODY = 32 * 1024 * 1024
MEMORY_GROWTH_LIMIT_KIB = 16 * 1024
MEMORY_ABSOLUTE_LIMIT_KIB = 120 * 1024


def test_memory_bounded_with_slow_peers(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    """Peak RSS grows by less than half of a 32 MiB body moved each way.

    Both slow peers cap their receive buffer at 64 KiB, so the kernel can
    keep little of the body in flight. Without streaming and backpressure,
    pgproxy must then keep most of the 32 MiB itself: all of it but its own
    socket send buffer (Linux caps that at net.ipv4.tcp_wmem, 4 MiB by
    default). A streaming proxy needs only its read buffers. Measured with
    this test's steps: pgproxy grew by about 0.2 MiB, a toy asyncio proxy
    that streams without backpressure by about 41 MiB, and one that buffers
    whole bodies by about 120 MiB. The 16 MiB limit sits between them.
    """
    upstream = upstream_factory("sink", rcvbuf=65536)
    proxy = pgproxy_factory(CONFIG.format(a=upstream.address))
    body = pattern_bytes(MEMORY_BODY)
    expected_sha256 = hashlib.sha256(body).hexdigest()

    # Warm up so that imports, pools and first buffers are in the baseline.
    upstream.handler = big_body(1024 * 1024)
    with RawConnection(proxy.port(), timeout=30) as conn:
        conn.send(build_request("GET", "/warm-up"))
        conn.read_response(timeout=30)
    baseline = proxy.vm_hwm_kib()

    upstream.handler = slow_sink(1.0)
    with RawConnection(proxy.port(), timeout=30) as conn:
        conn.send(build_request("PUT", "/slow-upload", body=body))
        document = echo_of(conn.read_response(timeout=30))
    assert document["body_length"] == MEMORY_BODY
    assert document["body_sha256"] == expected_sha256
    after_upload = proxy.vm_hwm_kib()

    upstream.handler = big_body(MEMORY_BODY)
    with RawConnection(proxy.port(), timeout=30, rcvbuf=65536) as conn:
        conn.send(build_request("GET", "/slow-download"))
        head = conn.read_head(timeout=30)
        assert head.status == 200, head.describe()
        time.sleep(
            1.0
        )  # the slow reader: pgproxy must stop reading the upstream meanwhile
        count, sha256 = conn.drain_digest(int(head.header("content-length") or 0))
    assert count == MEMORY_BODY
    assert sha256 == expected_sha256
    after_download = proxy.vm_hwm_kib()

    upload_growth = after_upload - baseline
    download_growth = after_download - baseline
    assert upload_growth < MEMORY_GROWTH_LIMIT_KIB, (
        f"peak RSS grew by {upload_growth} KiB (baseline {baseline} KiB) while a 32 "
        "MiB "
        f"upload went to a slow upstream: the request body is buffered, not streamed"
    )
    assert download_growth < MEMORY_GROWTH_LIMIT_KIB, (
        f"peak RSS grew by {download_growth} KiB (baseline {baseline} KiB) while a 32 "
        "MiB "
        f"download went to a slow client: the response body is buffered, not streamed"
    )
    assert after_download < MEMORY_ABSOLUTE_LIMIT_KIB, f"peak RSS {after_download} KiB"


def test_pooled_connection_after_slow_download(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    """A connection paused for backpressure serves the next request normally.

    A slow client makes pgproxy stop reading the upstream mid-response. Once
    the response is done the connection goes back to the pool and must read
    again, or the next request on it waits for response_header_timeout.
    Whether the last read of a response comes while reading is paused
    depends on timing, so the download is repeated a few times.
    """
    upstream = upstream_factory("a")
    upstream.handler = by_path({"/big": big_body(TEN_MIB)})
    config = CONFIG.format(a=upstream.address).replace(
        'response_header_timeout = "30s"', 'response_header_timeout = "1s"'
    )
    proxy = pgproxy_factory(config)
    for attempt in range(10):
        with RawConnection(proxy.port(), timeout=30, rcvbuf=65536) as conn:
            conn.send(build_request("GET", "/big"))
            head = conn.read_head(timeout=30)
            length = int(head.header("content-length") or 0)
            count, _ = conn.drain_digest(length, piece=65536, pause=0.001)
        assert count == TEN_MIB

        response = request(proxy.port(), "GET", f"/after-slow/{attempt}", timeout=10)
        assert response.status == 200, (
            f"attempt {attempt}: the request after a slowly read 10 MiB download "
            f"failed on the reused upstream connection:\n{response.describe()}"
        )
