"""Hostile operations against running pgproxy processes: signals, reloads, admin.

Each test drives real `pgproxy` processes over real sockets on 127.0.0.1 and
checks one operational promise. A worker survives the signals an operator
sends to the whole service. A reload that the workers reject leaves the
running config in force. A second instance cannot share a port in use. The
admin listener bounds a slow request. `--watch` reloads a changed file while
other files in its folder change. `check-upstreams --admin` exits 3 with an
error line whatever the admin address sends back. `pgproxy demo --requests N`
stops on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from e2e_admin import admin_port, get, status_json
from e2e_process import PgproxyFactory, PgproxyProcess, write_config
from e2e_upstream import (
    ReceivedRequest,
    UpstreamConnection,
    UpstreamFactory,
    fixed,
    response_bytes,
)

from pgproxy.server.admin import HEADER_READ_TIMEOUT

WORKERS_CONFIG = """
[server]
workers = 2
admin = "127.0.0.1:0"
drain_timeout = "2s"
access_log = "off"

[listeners.main]
address = "127.0.0.1:{port}"
{extra}

[[routes]]
name = "main"
cluster = "api"

[clusters.api]
endpoints = ["{api}"]
"""

SINGLE_CONFIG = """
[server]
admin = "127.0.0.1:0"
drain_timeout = "2s"
access_log = "off"

[listeners.main]
address = "127.0.0.1:0"
{extra}

[[routes]]
name = "main"
cluster = "{cluster}"

[clusters.blue]
endpoints = ["{blue}"]

[clusters.green]
endpoints = ["{green}"]
"""

MISSING_TLS_LISTENER = """
[listeners.secure]
address = "127.0.0.1:0"

[listeners.secure.tls]
certificate = "{directory}/missing.pem"
private_key = "{directory}/missing.key"
"""


def _workers_config(api: str, port: int = 0, extra: str = "") -> str:
    return WORKERS_CONFIG.format(api=api, port=port, extra=extra)


def _single_config(blue: str, green: str, cluster: str, extra: str = "") -> str:
    return SINGLE_CONFIG.format(blue=blue, green=green, cluster=cluster, extra=extra)


def _replace(path: Path, text: str) -> None:
    """Write a new config the way deploy tools do: a new file renamed over."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _worker_pids(admin: int) -> list[int]:
    return [worker["pid"] for worker in status_json(admin)["workers"] if worker["pid"]]


def _wait_all_workers_ready(admin: int, timeout: float) -> list[dict[str, object]]:
    """Poll /status until every worker is ready or `timeout` passes; return them."""
    deadline = time.monotonic() + timeout
    while True:
        workers: list[dict[str, object]] = status_json(admin)["workers"]
        if all(worker["ready"] for worker in workers):
            return workers
        if time.monotonic() >= deadline:
            return workers
        time.sleep(0.2)


def _failed_worker_reload(
    process: PgproxyProcess, api: str, directory: Path
) -> str | None:
    """Reload with a TLS listener whose files are missing; return the error line.

    The supervisor binds the new listener's socket without loading TLS files,
    so only the workers reject this config.
    """
    start = len(process.stderr_lines)
    extra = MISSING_TLS_LISTENER.format(directory=directory)
    _replace(process.config_path, _workers_config(api, extra=extra))
    process.signal(signal.SIGHUP)
    return process.wait_for_stderr("reload failed", timeout=10.0, start=start)


# -- workers -----------------------------------------------------------------


def test_worker_survives_sighup(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    # `systemctl kill -s HUP` and `pkill -HUP pgproxy` signal every process
    # of the service, workers included, so a worker must survive SIGHUP.
    api = upstream_factory("api")
    process = pgproxy_factory(_workers_config(api.address))
    admin = admin_port(process)
    victim = _worker_pids(admin)[0]
    start = len(process.stderr_lines)

    os.kill(victim, signal.SIGHUP)

    line = process.wait_for_stderr("exited with signal SIGHUP", 3.0, start)
    assert line is None, f"a worker died of SIGHUP: {line}"
    assert _alive(victim), f"worker pid {victim} is gone after SIGHUP"
    assert get(process.port("main"), "/")[0] == 200


def test_worker_rejected_reload_keeps_hash(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    tmp_path: Path,
) -> None:
    api = upstream_factory("api")
    process = pgproxy_factory(_workers_config(api.address))
    admin = admin_port(process)
    before = status_json(admin)["config"]["hash"]

    line = _failed_worker_reload(process, api.address, tmp_path)

    assert line is not None, f"no reload failure logged:\n{process.stderr_text()}"
    document = status_json(admin)
    assert document["config"]["last_reload"]["outcome"] == "failure"
    assert document["config"]["hash"] == before, (
        "/status reports the hash of a config every worker rejected as the "
        f"config in force ({document['config']['hash'][:12]} != {before[:12]})"
    )


def test_worker_restarts_after_rejected_reload(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    tmp_path: Path,
) -> None:
    api = upstream_factory("api")
    process = pgproxy_factory(_workers_config(api.address))
    admin = admin_port(process)
    assert _failed_worker_reload(process, api.address, tmp_path) is not None
    victim = _worker_pids(admin)[0]
    start = len(process.stderr_lines)

    os.kill(victim, signal.SIGKILL)

    assert process.wait_for_stderr("restarting", 5.0, start) is not None
    workers = _wait_all_workers_ready(admin, timeout=10.0)
    restarts = sum(int(str(worker["restarts"])) for worker in workers)
    assert all(worker["ready"] for worker in workers), (
        f"the replacement worker never became ready ({restarts} restarts); it "
        "was started with the config the workers had rejected:\n"
        + "\n".join(process.stderr_lines[start:][-15:])
    )
    assert restarts == 1


def test_second_instance_cannot_share_port(
    pgproxy_factory: PgproxyFactory,
    upstream_factory: UpstreamFactory,
    tmp_path: Path,
) -> None:
    first_api, second_api = upstream_factory("first"), upstream_factory("second")
    first = pgproxy_factory(_workers_config(first_api.address))
    port = first.port("main")
    directory = tmp_path / "second"
    directory.mkdir()
    config = write_config(directory, _workers_config(second_api.address, port=port))
    second = PgproxyProcess(config)
    second.start()
    try:
        ready = second.wait_for_stderr("pgproxy ready", timeout=10.0)
        code = second.wait_exit(5.0)
    finally:
        second.stop()

    assert ready is None, (
        f"a second pgproxy started on 127.0.0.1:{port}, which a running "
        "pgproxy serves; the kernel now splits new connections between them"
    )
    assert code == 1
    assert "in use" in second.stderr_text()


# -- single process reloads and --watch --------------------------------------


def test_reload_bind_failure_names_address(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    blue, green = upstream_factory("blue"), upstream_factory("green")
    process = pgproxy_factory(_single_config(blue.address, green.address, "blue"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        extra = f'[listeners.extra]\naddress = "{address}"'
        start = len(process.stderr_lines)
        _replace(
            process.config_path,
            _single_config(blue.address, green.address, "blue", extra),
        )
        process.signal(signal.SIGHUP)
        line = process.wait_for_stderr("reload failed", 10.0, start)

    assert line is not None, process.stderr_text()
    assert address in line, f"the bind error does not name the address: {line}"


def test_watch_reloads_while_folder_busy(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    # A log file next to the config is written more often than the watcher's
    # debounce interval, and the config's own change must still be reloaded.
    blue, green = upstream_factory("blue"), upstream_factory("green")
    process = pgproxy_factory(
        _single_config(blue.address, green.address, "blue"), "--watch"
    )
    folder = process.config_path.parent
    stop = threading.Event()

    def write_log() -> None:
        with open(folder / "pgproxy.log", "a") as log:
            for _ in range(100):  # at most 20 s
                if stop.wait(0.2):
                    return
                log.write("access line\n")
                log.flush()

    writer = threading.Thread(target=write_log, daemon=True)
    writer.start()
    try:
        time.sleep(0.5)
        start = len(process.stderr_lines)
        _replace(
            process.config_path, _single_config(blue.address, green.address, "green")
        )
        line = process.wait_for_stderr("reloaded", timeout=6.0, start=start)
        served = get(process.port("main"), "/")[2]["x-upstream"]
    finally:
        stop.set()
        writer.join(5)

    assert line is not None, (
        "--watch did not reload the changed config within 6s while another "
        "file in its folder kept changing"
    )
    assert served == "green"


def test_watch_logs_invalid_config_once(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    blue, green = upstream_factory("blue"), upstream_factory("green")
    process = pgproxy_factory(
        _single_config(blue.address, green.address, "blue"), "--watch"
    )
    start = len(process.stderr_lines)
    _replace(
        process.config_path, _single_config(blue.address, green.address, "missing")
    )
    assert process.wait_for_stderr("reload failed", 6.0, start) is not None

    # The invalid config stays as it is; only an unrelated file changes.
    for index in range(2):
        (process.config_path.parent / "notes.txt").write_text(f"edit {index}\n")
        time.sleep(2.2)

    failures = [
        line for line in process.stderr_lines[start:] if "reload failed" in line
    ]
    assert len(failures) == 1, (
        f"the unchanged invalid config was reported {len(failures)} times, once "
        "per change of an unrelated file in its folder"
    )
    assert get(process.port("main"), "/")[2]["x-upstream"] == "blue"


# -- admin listener ----------------------------------------------------------


def test_admin_slow_request_times_out(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    # One byte a second resets a per-read timeout forever, but the admin
    # listener promises to close a request not complete within the timeout.
    blue, green = upstream_factory("blue"), upstream_factory("green")
    process = pgproxy_factory(_single_config(blue.address, green.address, "blue"))
    admin = admin_port(process)
    head = b"GET /healthz HTTP/1.1\r\nHost: admin\r\nX-Slow: " + b"a" * 100
    closed = False
    with socket.create_connection(("127.0.0.1", admin), timeout=5) as sock:
        deadline = time.monotonic() + HEADER_READ_TIMEOUT + 1.5
        index = 0
        while time.monotonic() < deadline and index < len(head):
            try:
                sock.sendall(head[index : index + 1])
            except OSError:
                closed = True
                break
            index += 1
            time.sleep(1.0)
        if not closed:
            sock.settimeout(1.0)
            try:
                sock.recv(4096)  # a response or EOF means the server ended the request
                closed = True
            except TimeoutError:
                closed = False
            except OSError:
                closed = True

    assert closed, (
        f"the admin listener kept a request open for over "
        f"{HEADER_READ_TIMEOUT + 1.5:.1f}s by receiving one byte a second; "
        f"HEADER_READ_TIMEOUT is {HEADER_READ_TIMEOUT}s for the whole request"
    )


def test_validate_warns_admin_on_all_interfaces(tmp_path: Path) -> None:
    # The admin listener has no authentication, so binding it beyond loopback
    # deserves a warning. The config is only validated, never bound.
    config = tmp_path / "pgproxy.toml"
    config.write_text(
        '[server]\nadmin = "0.0.0.0:9901"\n\n'
        '[listeners.main]\naddress = "127.0.0.1:8080"\n\n'
        '[[routes]]\ncluster = "api"\n\n'
        '[clusters.api]\nendpoints = ["127.0.0.1:8000"]\n'
    )

    result = subprocess.run(
        [sys.executable, "-m", "pgproxy", "validate", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    warnings = [
        line
        for line in result.stdout.splitlines()
        if "warning" in line and "admin" in line
    ]
    assert warnings, (
        "no warning for an unauthenticated admin listener on 0.0.0.0:\n" + result.stdout
    )


# -- check-upstreams --admin -------------------------------------------------


def _crash_line(stderr: str) -> str:
    """Return the exception line that ends a traceback on stderr."""
    lines = stderr.strip().splitlines()
    return f"crashed with a traceback: {lines[-1] if lines else ''}"


def _check_admin(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pgproxy",
            "check-upstreams",
            "--admin",
            f"127.0.0.1:{port}",
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=10,
        env=dict(os.environ, NO_COLOR="1"),
    )


def test_check_admin_non_http_exits_3(upstream_factory: UpstreamFactory) -> None:
    server = upstream_factory("not-http")
    server.on_accept = "garbage"

    result = _check_admin(server.port, "--timeout", "2s")

    assert "Traceback" not in result.stderr, _crash_line(result.stderr)
    assert result.returncode == 3
    assert result.stderr.startswith("error: "), result.stderr


MALFORMED_STATUS = {
    "clusters-list": (b'{"clusters": {"a": [1, 2]}}', "json"),
    "endpoint-string": (b'{"clusters": {"a": {"10.0.0.1:80": "healthy"}}}', "json"),
    "since-string": (
        b'{"clusters": {"a": {"10.0.0.1:80": '
        b'{"status": "healthy", "since": "yesterday"}}}}',
        "text",
    ),
    "config-list": (
        b'{"config": [], "clusters": {"a": {"10.0.0.1:80": {"status": "healthy"}}}}',
        "text",
    ),
    "nested-arrays": (
        b'{"clusters": {}, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "json",
    ),
}


@pytest.mark.parametrize(
    ("document", "output_format"),
    MALFORMED_STATUS.values(),
    ids=list(MALFORMED_STATUS),
)
def test_check_admin_malformed_status_exits_3(
    upstream_factory: UpstreamFactory, document: bytes, output_format: str
) -> None:
    server = upstream_factory("fake-admin")
    server.handler = fixed(200, document, [("Content-Type", "application/json")])

    result = _check_admin(server.port, "--format", output_format)

    assert "Traceback" not in result.stderr, _crash_line(result.stderr)
    assert result.returncode == 3


def test_check_admin_timeout_bounds_slow_body(
    upstream_factory: UpstreamFactory,
) -> None:
    # `--timeout` is documented as the bound on the whole check.
    def trickle(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        conn.send(response_bytes(200, b"", [("Content-Length", "100")]))
        for _ in range(100):
            if conn.closed or conn.server.stopping.wait(0.5):
                break
            conn.send(b" ")
        return False

    server = upstream_factory("slow-admin")
    server.handler = trickle
    started = time.monotonic()

    try:
        result = _check_admin(server.port, "--timeout", "2s")
    except subprocess.TimeoutExpired:
        pytest.fail(
            "check-upstreams --admin --timeout 2s still ran after 10s against "
            "a body sent one byte every 0.5s",
            pytrace=False,
        )
    elapsed = time.monotonic() - started

    assert result.returncode == 3
    assert elapsed < 8.0


# -- demo --------------------------------------------------------------------


def test_demo_requests_stops_on_sigint() -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "pgproxy", "demo", "--requests", "100000000"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", NO_COLOR="1"),
    )
    listening = threading.Event()

    def watch_output() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            if "pgproxy listens on" in line:
                listening.set()

    reader = threading.Thread(target=watch_output, daemon=True)
    reader.start()
    try:
        assert listening.wait(15), "pgproxy demo never printed its address"
        time.sleep(1.5)  # let the event loop install its signal handlers

        demo.send_signal(signal.SIGINT)
        try:
            code: int | None = demo.wait(5)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        if demo.poll() is None:
            demo.kill()
        demo.wait(5)
        reader.join(5)
        stderr = demo.stderr.read() if demo.stderr is not None else ""
        for stream in (demo.stdout, demo.stderr):
            if stream is not None:
                stream.close()

    assert code is not None, "pgproxy demo --requests N ignored SIGINT for 5s"
    assert "Traceback" not in stderr, _crash_line(stderr)
