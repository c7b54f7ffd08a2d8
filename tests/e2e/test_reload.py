"""End-to-end tests of config reloads of a running `pgproxy run`.

Upstreams identify themselves with an X-Upstream header, so each response
shows which cluster served it.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from e2e_admin import KeepAliveLoad, Outcome, admin_port, get, status_json
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import (
    Upstream,
    UpstreamFactory,
    WebSocketUpstream,
    by_path,
    fixed,
    gated,
)
from test_proxy_lifecycle import BackgroundRequest

CONFIG = """
[server]
admin = "127.0.0.1:0"
access_log = "off"
drain_timeout = "5s"

[listeners.main]
address = "127.0.0.1:0"
{extra_listener}

[[routes]]
name = "main"
cluster = "{cluster}"

[[routes]]
name = "ws"
path_prefix = "/ws"
cluster = "ws"

[clusters.blue]
endpoints = ["{blue}"]

[clusters.green]
endpoints = ["{green}"]

[clusters.ws]
endpoints = ["{ws}"]
"""

RELOADS = 20


def _config(
    blue: Upstream,
    green: Upstream,
    ws: str,
    cluster: str,
    extra_listener: str = "",
) -> str:
    return CONFIG.format(
        blue=blue.address,
        green=green.address,
        ws=ws,
        cluster=cluster,
        extra_listener=extra_listener,
    )


def _replace(path: Path, text: str) -> None:
    """Write a new config the way deploy tools do: a new file renamed over."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def _reload(process: PgproxyProcess, path: Path, text: str, expect: str) -> str:
    """Write `text`, send SIGHUP and return the log line of the outcome."""
    start = len(process.stderr_lines)
    _replace(path, text)
    process.signal(signal.SIGHUP)
    line = process.wait_for_stderr(expect, timeout=10.0, start=start)
    assert line is not None, f"no {expect!r} line; stderr:\n{process.stderr_text()}"
    return line


@pytest.fixture
def blue_green(upstream_factory: UpstreamFactory) -> tuple[Upstream, Upstream]:
    return upstream_factory("blue"), upstream_factory("green")


def _allowed(outcome: Outcome, sent: list[float], done: list[float]) -> set[str]:
    """Clusters that may have been in force at some time during the request.

    Config k (k = 0 initially) may be in force from the SIGHUP of reload k
    until the log line of reload k + 1 was seen; configs alternate blue and
    green.
    """
    allowed = set()
    for k in range(len(sent) + 1):
        begins = sent[k - 1] if k > 0 else float("-inf")
        ends = done[k] if k < len(done) else float("inf")
        if begins <= outcome.ended and outcome.started <= ends:
            allowed.add("blue" if k % 2 == 0 else "green")
    return allowed


def test_reloads_under_load_lose_nothing(
    pgproxy_factory: PgproxyFactory, blue_green: tuple[Upstream, Upstream]
) -> None:
    blue, green = blue_green
    process = pgproxy_factory(_config(blue, green, blue.address, "blue"))
    configs = [
        _config(blue, green, blue.address, "green"),
        _config(blue, green, blue.address, "blue"),
    ]
    load = KeepAliveLoad(process.port("main"), "/", threads=4, rate_per_thread=100)
    load.start(seconds=10.0, max_requests=4000)

    sent: list[float] = []
    done: list[float] = []
    time.sleep(0.3)
    for index in range(RELOADS):
        sent.append(time.monotonic())
        _reload(process, process.config_path, configs[index % 2], "reloaded")
        done.append(time.monotonic())
        time.sleep(0.35)
    outcomes = load.join()
    elapsed = outcomes[-1].ended - outcomes[0].started
    print(f"{len(outcomes)} requests in {elapsed:.1f}s across {RELOADS} reloads")

    assert len(outcomes) >= 1000, "the load generator fell far behind"
    failed = [outcome for outcome in outcomes if outcome.status != 200]
    assert failed == [], f"{len(failed)} of {len(outcomes)} requests failed"
    wrong = [
        outcome
        for outcome in outcomes
        if outcome.upstream not in _allowed(outcome, sent, done)
    ]
    assert wrong == [], f"{len(wrong)} responses came from the wrong cluster"
    served = {outcome.upstream for outcome in outcomes}
    assert served == {"blue", "green"}


def test_invalid_config_keeps_running_one(
    pgproxy_factory: PgproxyFactory, blue_green: tuple[Upstream, Upstream]
) -> None:
    blue, green = blue_green
    process = pgproxy_factory(_config(blue, green, blue.address, "blue"))
    admin = admin_port(process)
    before = status_json(admin)["config"]["hash"]
    invalid = _config(blue, green, blue.address, "green").replace(
        'drain_timeout = "5s"', "drain_timeout = 5\nworkerz = 2"
    )

    line = _reload(process, process.config_path, invalid, "reload failed")

    assert "keeping the running config" in line
    assert "2 problems" in line
    assert "drain_timeout" in line
    assert "workerz" in line
    status, _, headers = get(process.port("main"), "/")
    assert status == 200
    assert headers["x-upstream"] == "blue"
    document = status_json(admin)
    assert document["config"]["hash"] == before
    assert document["config"]["last_reload"]["outcome"] == "failure"


def test_websocket_survives_reload(
    pgproxy_factory: PgproxyFactory,
    blue_green: tuple[Upstream, Upstream],
    websocket_upstream: WebSocketUpstream,
) -> None:
    from websockets.sync.client import connect

    blue, green = blue_green
    ws = websocket_upstream.address
    process = pgproxy_factory(_config(blue, green, ws, "blue"))
    url = f"ws://127.0.0.1:{process.port('main')}/ws/chat"

    with connect(url, open_timeout=5, close_timeout=2) as websocket:
        websocket.send("before")
        assert websocket.recv(timeout=5) == "before"

        _reload(
            process, process.config_path, _config(blue, green, ws, "green"), "reloaded"
        )

        websocket.send("after")
        assert websocket.recv(timeout=5) == "after"
    status, _, headers = get(process.port("main"), "/")
    assert (status, headers["x-upstream"]) == (200, "green")


def test_websocket_closed_when_endpoint_removed(
    pgproxy_factory: PgproxyFactory,
    blue_green: tuple[Upstream, Upstream],
    websocket_upstream: WebSocketUpstream,
) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    blue, green = blue_green
    replacement = WebSocketUpstream()
    try:
        old, new = websocket_upstream.address, replacement.address
        process = pgproxy_factory(_config(blue, green, old, "blue"))
        url = f"ws://127.0.0.1:{process.port('main')}/ws/chat"

        with connect(url, open_timeout=5, close_timeout=2) as websocket:
            websocket.send("before")
            assert websocket.recv(timeout=5) == "before"

            _reload(
                process,
                process.config_path,
                _config(blue, green, new, "blue"),
                "reloaded",
            )

            with pytest.raises(ConnectionClosed):
                websocket.send("after")
                websocket.recv(timeout=5)
        with connect(url, open_timeout=5, close_timeout=2) as websocket:
            websocket.send("again")
            assert websocket.recv(timeout=5) == "again"
        assert replacement.paths == ["/ws/chat"]
    finally:
        replacement.stop()


def test_listener_added_then_removed(
    pgproxy_factory: PgproxyFactory, blue_green: tuple[Upstream, Upstream]
) -> None:
    blue, green = blue_green
    process = pgproxy_factory(_config(blue, green, blue.address, "blue"))
    extra = '[listeners.extra]\naddress = "127.0.0.1:0"'
    main_port = process.port("main")

    line = _reload(
        process,
        process.config_path,
        _config(blue, green, blue.address, "blue", extra),
        'listener "extra" listening on',
    )
    extra_port = int(line.rpartition(":")[2])

    assert get(extra_port, "/")[0] == 200
    assert get(main_port, "/")[0] == 200
    _reload(
        process,
        process.config_path,
        _config(blue, green, blue.address, "blue"),
        "reloaded",
    )
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", extra_port), timeout=5).close()
    assert get(main_port, "/")[0] == 200


def test_watch_reloads_on_file_change(
    pgproxy_factory: PgproxyFactory, blue_green: tuple[Upstream, Upstream]
) -> None:
    blue, green = blue_green
    process = pgproxy_factory(_config(blue, green, blue.address, "blue"), "--watch")
    start = len(process.stderr_lines)

    _replace(process.config_path, _config(blue, green, blue.address, "green"))

    assert process.wait_for_stderr("reloaded", timeout=10.0, start=start) is not None
    status, _, headers = get(process.port("main"), "/")
    assert (status, headers["x-upstream"]) == (200, "green")


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_burst_is_coalesced(
    pgproxy_factory: PgproxyFactory,
    blue_green: tuple[Upstream, Upstream],
    workers: int,
) -> None:
    blue, green = blue_green
    config = _config(blue, green, blue.address, "blue")
    process = pgproxy_factory(
        config.replace("[server]", f"[server]\nworkers = {workers}")
    )
    # 30 signals in well under a millisecond, while the first reload's loader
    # child runs for about 0.15 s: at most one more reload may follow it.
    for _ in range(30):
        os.kill(process.pid, signal.SIGHUP)
    assert process.wait_for_stderr("reloaded", timeout=20) is not None
    time.sleep(1.5)  # any further reload would have started by now
    reloads = process.stderr_text().count("reloading ")
    assert 1 <= reloads <= 3, process.stderr_text()
    status, _, headers = get(process.port("main"), "/")
    assert status == 200
    assert headers["x-upstream"] == "blue"


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sighup_during_drain_is_ignored(
    pgproxy_factory: PgproxyFactory,
    blue_green: tuple[Upstream, Upstream],
    workers: int,
) -> None:
    blue, green = blue_green
    gate = threading.Event()
    blue.handler = by_path({"/slow": gated(gate, fixed(200, b"slow"))})
    config = _config(blue, green, blue.address, "blue")
    process = pgproxy_factory(
        config.replace("[server]", f"[server]\nworkers = {workers}")
    )
    extra = '[listeners.extra]\naddress = "127.0.0.1:0"'
    # An in-flight request keeps the drain going while the reload arrives.
    slow = BackgroundRequest(process.port("main"), "/slow")
    slow.start()
    try:
        blue.wait_for_requests(1)
        process.signal(signal.SIGTERM)
        assert process.wait_for_stderr("stopped accepting", 10) is not None

        _reload(
            process,
            process.config_path,
            _config(blue, green, blue.address, "blue", extra).replace(
                "[server]", f"[server]\nworkers = {workers}"
            ),
            "SIGHUP ignored",
        )
    finally:
        gate.set()
    slow.join(20)
    code = process.wait_exit(20)

    assert slow.response is not None and slow.response.status == 200
    assert code == 0
    assert not any('listener "extra"' in line for line in process.stderr_lines)
