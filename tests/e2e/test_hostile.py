"""Hostile inputs against a running `pgproxy run`: bad reloads, rogue upstreams.

A reload with a config the loader cannot handle must keep the running config,
as any invalid config does. An upstream that sends bytes beyond its response,
or a response head without end, must cost only that one exchange: it must
neither poison a pooled connection for the next client nor grow the proxy's
memory with its size.
"""

from __future__ import annotations

import signal

import pytest
from e2e_client import RawConnection, build_request, echo_of, request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import (
    ReceivedRequest,
    UpstreamConnection,
    UpstreamFactory,
    by_path,
    echo,
)

CONFIG = """
[server]
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
cluster = "a"

[clusters.a]
endpoints = ["{a}"]
max_idle_connections = 1
"""

NESTING_DEPTH = 2000


def _reload_and_wait(process: PgproxyProcess, text: str) -> str | None:
    """Write `text` as the config and send SIGHUP; return the "reload failed" line."""
    start = len(process.stderr_lines)
    process.config_path.write_text(text)
    process.signal(signal.SIGHUP)
    return process.wait_for_stderr("reload failed", timeout=10.0, start=start)


def _assert_still_serving(process: PgproxyProcess) -> None:
    assert process.proc is not None
    code = process.proc.poll()
    assert code is None, (
        f"pgproxy exited with code {code} after the reload; "
        f"stderr:\n{process.stderr_text()[-3000:]}"
    )
    response = request(process.port(), target="/after-reload")
    echo_of(response)


@pytest.mark.parametrize(
    "junk",
    [
        "[" * NESTING_DEPTH + "]" * NESTING_DEPTH,
        "{a = " * NESTING_DEPTH + "1" + "}" * NESTING_DEPTH,
    ],
    ids=["array", "inline-table"],
)
def test_reload_nested_toml_keeps_running(
    upstream_factory: UpstreamFactory, pgproxy_factory: PgproxyFactory, junk: str
) -> None:
    upstream = upstream_factory("a")
    config = CONFIG.format(a=upstream.address)
    process = pgproxy_factory(config)

    line = _reload_and_wait(process, config + f"junk = {junk}\n")

    _assert_still_serving(process)
    assert line is not None, (
        "no 'reload failed' line logged for a config nested "
        f"{NESTING_DEPTH} levels deep; stderr:\n{process.stderr_text()[-3000:]}"
    )


def test_reload_nested_regex_keeps_running(
    upstream_factory: UpstreamFactory, pgproxy_factory: PgproxyFactory
) -> None:
    upstream = upstream_factory("a")
    config = CONFIG.format(a=upstream.address)
    process = pgproxy_factory(config)
    regex = "(a|" * 500 + "a" + ")" * 500
    invalid_config = (
        config + f'\n[[routes]]\npath_regex = "^/{regex}$"\ncluster = "a"\n'
    )

    line = _reload_and_wait(process, invalid_config)

    _assert_still_serving(process)
    assert line is not None, (
        "no 'reload failed' line logged for a path_regex nested 500 groups deep; "
        f"stderr:\n{process.stderr_text()[-3000:]}"
    )


def _no_content_with_body(request: ReceivedRequest, conn: UpstreamConnection) -> None:
    # RFC 9110 15.3.5: a 204 response ends at its header block, so the five
    # bytes after it belong to no response.
    conn.send(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nstray")


def test_stray_bytes_after_204_not_pooled(
    upstream_factory: UpstreamFactory, pgproxy_factory: PgproxyFactory
) -> None:
    upstream = upstream_factory("a")
    upstream.handler = by_path({"/no-content": _no_content_with_body}, default=echo)
    process = pgproxy_factory(CONFIG.format(a=upstream.address))
    port = process.port()

    first = request(port, target="/no-content")
    second = request(port, target="/next")

    assert first.status == 204, f"expected the upstream's 204:\n{first.describe()}"
    assert second.status == 200, (
        "the request after a 204 followed by stray bytes failed; the pooled "
        "connection with unread bytes was reused:\n"
        f"{second.describe()}\nstderr:\n{process.stderr_text()[-2000:]}"
    )
    assert echo_of(second)["target"] == "/next"


def _huge_head(request: ReceivedRequest, conn: UpstreamConnection) -> bool:
    filler = b"X-Filler: " + b"v" * 1000 + b"\r\n"
    head = b"HTTP/1.1 200 OK\r\n" + filler * (16 * 1024) + b"Content-Length: 2\r\n\r\n"
    conn.send(head + b"ok")
    return False


def test_upstream_response_head_bounded(
    upstream_factory: UpstreamFactory, pgproxy_factory: PgproxyFactory
) -> None:
    upstream = upstream_factory("a")
    upstream.handler = by_path({"/huge-head": _huge_head}, default=echo)
    process = pgproxy_factory(CONFIG.format(a=upstream.address))
    port = process.port()
    echo_of(request(port, target="/warm-up"))
    baseline_kib = process.vm_hwm_kib()

    with RawConnection(port, timeout=10.0) as conn:
        conn.send(build_request("GET", "/huge-head"))
        response = conn.read_response(allow_incomplete=True)
    growth_mib = (process.vm_hwm_kib() - baseline_kib) / 1024

    assert response.status == 502, (
        "a 16 MiB upstream response header block was forwarded instead of "
        f"rejected with 502:\n{response.describe()[:500]}"
    )
    assert growth_mib < 8, (
        f"peak RSS grew by {growth_mib:.1f} MiB while pgproxy read a 16 MiB "
        "response header block; the head is buffered without a limit"
    )
