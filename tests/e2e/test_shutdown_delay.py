"""End-to-end tests of `[server] shutdown_delay`.

After SIGTERM, admin /healthz turns 503 at once, but the listeners stay
open for shutdown_delay so that an outer load balancer polling /healthz
stops sending before connections are refused. A second signal ends the
delay. Both with one process and with workers, where each worker waits.
"""

from __future__ import annotations

import signal

import pytest
from e2e_admin import admin_port, get
from e2e_process import PgproxyFactory
from e2e_upstream import UpstreamFactory

CONFIG = """
[server]
admin = "127.0.0.1:0"
workers = {workers}
drain_timeout = "5s"
shutdown_delay = "{delay}"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
path_prefix = "/"
cluster = "a"

[clusters.a]
endpoints = ["{a}"]
"""

WORKERS = pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])


@WORKERS
def test_delay_serves_new_connections(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory, workers: int
) -> None:
    upstream = upstream_factory("a")
    proxy = pgproxy_factory(
        CONFIG.format(workers=workers, delay="60s", a=upstream.address)
    )
    admin, port = admin_port(proxy), proxy.port("main")

    proxy.signal(signal.SIGTERM)
    waiting = proxy.wait_for_stderr("closing the listeners in 60s", 10)
    assert waiting is not None, proxy.stderr_text()
    health = get(admin, "/healthz")
    # A new connection after the 503: the listener must still accept it.
    status, body, _ = get(port, "/after-sigterm")

    assert health[:2] == (503, b"draining\n")
    assert status == 200, body
    assert not any("stopped accepting" in line for line in proxy.stderr_lines)

    proxy.signal(signal.SIGINT)
    code = proxy.wait_exit(20)
    assert code == 0, f"exit code {code}:\n{proxy.stderr_text()}"
    assert proxy.wait_for_stderr("shutdown_delay cut short", 1) is not None


@WORKERS
def test_delay_end_closes_listeners(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory, workers: int
) -> None:
    upstream = upstream_factory("a")
    proxy = pgproxy_factory(
        CONFIG.format(workers=workers, delay="500ms", a=upstream.address)
    )

    proxy.signal(signal.SIGTERM)
    code = proxy.wait_exit(20)

    assert code == 0, f"exit code {code}:\n{proxy.stderr_text()}"
    lines = proxy.stderr_lines
    waiting = next(i for i, text in enumerate(lines) if "closing the listeners" in text)
    closing = next(i for i, text in enumerate(lines) if "stopped accepting" in text)
    assert waiting < closing
    assert not any("cut short" in line for line in lines)


def test_no_delay_by_default(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    upstream = upstream_factory("a")
    config = CONFIG.format(workers=1, delay="0s", a=upstream.address)
    proxy = pgproxy_factory(config.replace('shutdown_delay = "0s"\n', ""))

    proxy.signal(signal.SIGTERM)
    code = proxy.wait_exit(20)

    assert code == 0, f"exit code {code}:\n{proxy.stderr_text()}"
    assert not any("closing the listeners" in line for line in proxy.stderr_lines)


@WORKERS
def test_sighup_during_delay_is_ignored(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory, workers: int
) -> None:
    upstream = upstream_factory("a")
    config = CONFIG.format(workers=workers, delay="60s", a=upstream.address)
    proxy = pgproxy_factory(config)
    admin_port(proxy)

    proxy.signal(signal.SIGTERM)
    assert proxy.wait_for_stderr("closing the listeners in 60s", 10) is not None
    # A listener added now would open in a process about to close the others.
    proxy.config_path.write_text(
        config + '\n[listeners.extra]\naddress = "127.0.0.1:0"\n'
    )
    proxy.signal(signal.SIGHUP)
    ignored = proxy.wait_for_stderr("SIGHUP ignored", 10)
    proxy.signal(signal.SIGINT)
    code = proxy.wait_exit(20)

    assert ignored is not None, proxy.stderr_text()
    assert code == 0
    assert not any('listener "extra"' in line for line in proxy.stderr_lines)
