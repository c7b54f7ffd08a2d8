"""Process lifecycle of `pgproxy run`: graceful drain on signals, startup failures.

SIGTERM or SIGINT must stop accepting, let in-flight requests finish within
drain_timeout, close idle keep-alive connections, and exit 0. A listener
that cannot bind, or an invalid config, must exit 1 with one clear line.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_client import RawConnection, Response, build_request, echo_of
from e2e_process import PgproxyFactory, PgproxyProcess, write_config
from e2e_upstream import UpstreamFactory, by_path, chunked, echo, gated, hang

CONFIG = """
[server]
access_log = "json"
drain_timeout = "{drain}"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
path_prefix = "/"
cluster = "a"

[clusters.a]
endpoints = ["{a}"]
"""


def connect_refused(port: int) -> bool:
    """Return True when a new connection to `port` is refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


class BackgroundRequest(threading.Thread):
    """Send one request and read its response on a background thread."""

    def __init__(self, port: int, target: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.target = target
        self.response: Response | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with RawConnection(self.port, timeout=20) as conn:
                conn.send(build_request("GET", self.target))
                self.response = conn.read_response(timeout=20)
        except BaseException as exc:
            self.error = exc


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"]
)
def test_signal_drains_in_flight_request(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    gate: threading.Event,
    signum: int,
) -> None:
    upstream = upstream_factory("slow")
    upstream.handler = by_path({"/in-flight": gated(gate, echo)})
    proxy = pgproxy_factory(CONFIG.format(drain="20s", a=upstream.address))
    port = proxy.port()

    idle = RawConnection(port)
    idle.send(build_request("GET", "/idle-first"))
    echo_of(idle.read_response())

    in_flight = BackgroundRequest(port, "/in-flight")
    in_flight.start()
    upstream.wait_for_requests(2)
    proxy.signal(signum)

    assert proxy.wait_for_stderr("draining", 5) is not None, (
        f"no 'draining' line:\n{proxy.stderr_text()}"
    )
    deadline = time.monotonic() + 5
    while not connect_refused(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert connect_refused(port), "pgproxy still accepts connections while draining"
    assert idle.wait_closed(5) is not None, (
        "an idle keep-alive connection stayed open during the drain"
    )
    idle.close()

    gate.set()
    in_flight.join(20)
    assert in_flight.error is None, (
        f"the in-flight request failed during the drain: {in_flight.error}"
    )
    assert in_flight.response is not None
    assert echo_of(in_flight.response)["target"] == "/in-flight"

    code = proxy.wait_exit(10)
    assert code == 0, (
        f"pgproxy exited with {code} after draining:\n{proxy.stderr_text()}"
    )
    assert proxy.wait_for_stderr("stopped", 2) is not None, (
        f"no 'stopped' line:\n{proxy.stderr_text()}"
    )


def test_drain_timeout_bounds_shutdown(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    upstream = upstream_factory("stuck")
    upstream.handler = hang
    proxy = pgproxy_factory(CONFIG.format(drain="1s", a=upstream.address))
    stuck = BackgroundRequest(proxy.port(), "/stuck")
    stuck.start()
    upstream.wait_for_requests(1)
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    code = proxy.wait_exit(10)
    assert code is not None, "pgproxy did not exit within 10s with drain_timeout = 1s"
    assert code == 0, f"exit code {code}:\n{proxy.stderr_text()}"
    assert time.monotonic() - started < 10
    stuck.join(10)
    assert stuck.response is None or stuck.response.status >= 500, (
        "a request cut off by the drain timeout must not look successful"
    )
    # pgproxy cut the request, so the access log must not blame the client.
    record = proxy.access_for_path("/stuck")
    assert record["failure"] == "drain_timeout"
    assert record["status"] == 499


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_second_signal_cuts_drain_short(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory, workers: int
) -> None:
    upstream = upstream_factory("stuck")
    upstream.handler = hang
    config = CONFIG.format(drain="60s", a=upstream.address).replace(
        "[server]", f"[server]\nworkers = {workers}"
    )
    proxy = pgproxy_factory(config)
    stuck = BackgroundRequest(proxy.port(), "/stuck")
    stuck.start()
    upstream.wait_for_requests(1)

    proxy.signal(signal.SIGINT)
    # Logged by the process that serves the request once its drain has begun.
    assert proxy.wait_for_stderr("draining 1 client connections", 10) is not None, (
        proxy.stderr_text()
    )
    proxy.signal(signal.SIGINT)

    code = proxy.wait_exit(20)
    assert code is not None, (
        "a second SIGINT did not cut short a 60s drain within 20s:\n"
        f"{proxy.stderr_text()}"
    )
    assert code == 0, f"exit code {code}:\n{proxy.stderr_text()}"
    assert proxy.wait_for_stderr("the drain is cancelled", 1) is not None
    stuck.join(10)
    assert stuck.response is None or stuck.response.status >= 500, (
        "a request cut off by the cancelled drain must not look successful"
    )
    record = proxy.access_for_path("/stuck")
    assert record["failure"] == "drain_cancelled"
    assert record["status"] == 499


def run_to_exit(tmp_path: Path, config_text: str) -> tuple[int | None, PgproxyProcess]:
    process = PgproxyProcess(write_config(tmp_path, config_text))
    process.start()
    code = process.wait_exit(15)
    if code is None:
        process.kill()
    else:
        process.stop()
    return code, process


def assert_one_clear_line(process: PgproxyProcess, *fragments: str) -> None:
    text = process.stderr_text()
    assert "Traceback" not in text, f"startup failure printed a traceback:\n{text}"
    assert "pgproxy ready" not in text
    matching = [
        line for line in process.stderr_lines if all(f in line for f in fragments)
    ]
    assert matching, f"no stderr line mentions {fragments}:\n{text}"


def test_bind_failure_exits_1(
    tmp_path: Path, upstream_factory: UpstreamFactory
) -> None:
    upstream = upstream_factory("a")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        config = CONFIG.format(drain="1s", a=upstream.address).replace(
            'address = "127.0.0.1:0"', f'address = "127.0.0.1:{port}"'
        )
        code, process = run_to_exit(tmp_path, config)
    finally:
        taken.close()
    assert code == 1, f"exit code {code} for a port in use:\n{process.stderr_text()}"
    assert_one_clear_line(process, str(port))


def test_invalid_config_exits_1(tmp_path: Path) -> None:
    config = (
        CONFIG.format(drain="1s", a="127.0.0.1:9")
        + '\n[listeners.main2]\naddres = "127.0.0.1:0"\n'
    )
    code, process = run_to_exit(tmp_path, config)
    assert code == 1, (
        f"exit code {code} for an invalid config:\n{process.stderr_text()}"
    )
    assert_one_clear_line(process, "addres")


def test_unknown_cluster_exits_1(tmp_path: Path) -> None:
    config = CONFIG.format(drain="1s", a="127.0.0.1:9").replace(
        'cluster = "a"', 'cluster = "missing"'
    )
    code, process = run_to_exit(tmp_path, config)
    assert code == 1, (
        f"exit code {code} for a route naming an unknown "
        f"cluster:\n{process.stderr_text()}"
    )
    assert_one_clear_line(process, "missing")


def test_ipv6_listener(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    upstream = upstream_factory("a")
    config = CONFIG.format(drain="1s", a=upstream.address).replace(
        'address = "127.0.0.1:0"', 'address = "[::1]:0"'
    )
    proxy = pgproxy_factory(config)
    with socket.create_connection(("::1", proxy.port()), timeout=5) as sock:
        sock.sendall(build_request("GET", "/over-ipv6"))
        data = b""
        while b"/over-ipv6" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    forwarded_for = upstream.requests[0].header("x-forwarded-for")
    assert forwarded_for == "::1", (
        f"X-Forwarded-For for an IPv6 client: {forwarded_for!r}"
    )


def test_drain_timeout_resets_http10_client(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    gate: threading.Event,
) -> None:
    # The client reads its body until the connection closes, so a FIN at the
    # end of the drain would make the cut body look complete.
    upstream = upstream_factory("a")
    upstream.handler = chunked([b"first piece", b"never sent"], gate=gate)
    proxy = pgproxy_factory(CONFIG.format(drain="1s", a=upstream.address))
    with RawConnection(proxy.port(), timeout=20) as conn:
        conn.send(b"GET /slow HTTP/1.0\r\nHost: a\r\n\r\n")
        head = conn.read_head()
        assert head.status == 200, head.describe()
        proxy.signal(signal.SIGTERM)
        conn.sock.settimeout(20)
        ending = "fin"
        try:
            while conn.sock.recv(65536):
                pass
        except ConnectionResetError:
            ending = "reset"
    assert proxy.wait_exit(10) == 0, proxy.stderr_text()
    assert ending == "reset", "a body cut by the drain timeout ended with a FIN"
    record = proxy.access_for_path("/slow")
    assert record["failure"] == "drain_timeout"
    assert record["status"] == 200
