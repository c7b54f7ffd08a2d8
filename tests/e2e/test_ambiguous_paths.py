"""Ambiguous path spellings rejected before routing by `reject_ambiguous_paths`.

One pgproxy process serves the module with two listeners in front of the
same routes: `/admin` responds with 403, everything else goes to one
upstream. Listener `strict` rejects every ambiguous spelling; listener
`open` keeps the default and forwards them, which shows the bypass that the
setting closes. A rejected request must get 400 without contacting the
upstream, so each test ends with a canary request, the only one the upstream
may see.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_client import RawConnection, build_request, echo_of, request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import Upstream, UpstreamFactory

CONFIG = """
[server]
drain_timeout = "1s"

[listeners.strict]
address = "127.0.0.1:0"
reject_ambiguous_paths = {strict_paths}

[listeners.open]
address = "127.0.0.1:0"

[[routes]]
name = "admin"
path_prefix = "/admin"
respond = {{ status = 403 }}

[[routes]]
name = "all"
cluster = "all"

[clusters.all]
endpoints = ["{all}"]
"""

# Each spelling, the name that rejects it and the text the 400 names.
REJECTED = [
    ("/admin;x", "semicolon", ";"),
    ("/admin;jsessionid=0A1B/users", "semicolon", ";"),
    ("/admin%3Bx", "semicolon", "%3B"),
    ("/admin%3bx", "semicolon", "%3b"),
    ("/admin\\x", "backslash", "\\"),
    ("/x\\..\\admin", "backslash", "\\"),
    ("/admin%5Cx", "backslash", "%5C"),
    ("/admin%5cx", "backslash", "%5c"),
    ("/admin/x%2F..%2F..%2Fpublic", "escaped_slash", "%2F"),
    ("/admin/x%2f..%2f..%2fpublic", "escaped_slash", "%2f"),
    ("/%2561dmin", "escaped_percent", "%25"),
    ("/x%252F..%252Fadmin", "escaped_percent", "%25"),
    ("/x/..%C0%AFadmin", "overlong_utf8", "%C0%AF"),
    ("/x/%c0%ae%c0%ae/admin", "overlong_utf8", "%c0%ae"),
    ("/x/%E0%80%AE%E0%80%AE%E0%80%AFadmin", "overlong_utf8", "%E0%80%AE"),
]
CANARY = "/canary"
ALL_NAMES = (
    '["semicolon", "backslash", "escaped_slash", "escaped_percent", "overlong_utf8"]'
)


def _config(upstream: Upstream, strict_paths: str = ALL_NAMES) -> str:
    return CONFIG.format(all=upstream.address, strict_paths=strict_paths)


@pytest.fixture(scope="module")
def upstream(module_upstream_factory: UpstreamFactory) -> Upstream:
    return module_upstream_factory("all")


@pytest.fixture(scope="module")
def proxy(module_pgproxy_factory: PgproxyFactory, upstream: Upstream) -> PgproxyProcess:
    return module_pgproxy_factory(_config(upstream), "--log-level", "DEBUG")


@pytest.fixture(autouse=True)
def fresh_upstream(upstream: Upstream) -> Iterator[None]:
    upstream.reset()
    yield


def _targets(upstream: Upstream) -> list[str]:
    return [received.target for received in upstream.requests]


@pytest.mark.parametrize(("target", "name", "text"), REJECTED)
def test_spelling_gets_400_and_never_reaches_upstream(
    proxy: PgproxyProcess, upstream: Upstream, target: str, name: str, text: str
) -> None:
    with RawConnection(proxy.port("strict")) as conn:
        conn.send(build_request("GET", target))
        rejected = conn.read_response()
        conn.send(build_request("GET", CANARY))
        canary = conn.read_response()

    assert rejected.status == 400, rejected.describe()
    assert rejected.body == f'ambiguous request path: it contains "{text}"\n'.encode()
    assert rejected.header("Content-Type") == "text/plain; charset=utf-8"
    assert canary.status == 200, canary.describe()
    assert _targets(upstream) == [CANARY]


@pytest.mark.parametrize(("target", "name", "text"), REJECTED)
def test_rejection_is_logged(
    proxy: PgproxyProcess, target: str, name: str, text: str
) -> None:
    with RawConnection(proxy.port("strict")) as conn:
        conn.send(build_request("GET", target))
        assert conn.read_response().status == 400
        client = f"127.0.0.1:{conn.local_port}"

    [record] = proxy.wait_for_access(lambda record: record["client"] == client)
    assert record["path"] == target
    assert record["status"] == 400
    assert record["failure"] == "ambiguous_path"
    assert record["listener"] == "strict"
    assert record["route"] is None
    assert record["endpoint"] is None
    assert record["attempts"] == 0
    line = proxy.wait_for_stderr(f"rejecting request from {client} with 400")
    assert line == (
        f"DEBUG pgproxy.proxy.exchange: rejecting request from {client} with 400: "
        f"the path contains {text!r} ({name}), which listener strict rejects"
    )


@pytest.mark.parametrize(("target", "name", "text"), REJECTED)
def test_default_listener_forwards_the_spelling(
    proxy: PgproxyProcess, upstream: Upstream, target: str, name: str, text: str
) -> None:
    echo = echo_of(request(proxy.port("open"), target=target))
    assert echo["target"] == target
    assert _targets(upstream) == [target]


@pytest.mark.parametrize(
    "target",
    [
        "/search?q=a;b",
        "/search?q=a%2Fb&r=%2f",
        "/search?next=%252F%5C%3B",
        "/search?p=\\x",
        "/?;",
        "/a%20b/caf%C3%A9",
        "/x/%2E%2E/public",
    ],
)
def test_query_and_other_escapes_pass(
    proxy: PgproxyProcess, upstream: Upstream, target: str
) -> None:
    echo = echo_of(request(proxy.port("strict"), target=target))
    assert echo["target"] == target
    assert _targets(upstream) == [target]


def test_absolute_form_target_is_checked(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    target = "http://test.local/admin;x?y=1"
    with RawConnection(proxy.port("strict")) as conn:
        conn.send(build_request("GET", target))
        rejected = conn.read_response()
        conn.send(build_request("GET", CANARY))
        canary = conn.read_response()

    assert rejected.status == 400, rejected.describe()
    assert canary.status == 200, canary.describe()
    assert _targets(upstream) == [CANARY]


def test_request_with_body_is_rejected(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    with RawConnection(proxy.port("strict")) as conn:
        conn.send(build_request("POST", "/admin;x", body=b"x" * 1000))
        rejected = conn.read_response("POST")
        conn.send(build_request("GET", CANARY))
        canary = conn.read_response()

    assert rejected.status == 400, rejected.describe()
    assert canary.status == 200, canary.describe()
    assert _targets(upstream) == [CANARY]


def test_rejection_before_the_body_ends_closes_the_connection(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    head = build_request("POST", "/admin;x", headers=[("Content-Length", "1000")])
    with RawConnection(proxy.port("strict")) as conn:
        conn.send(head + b"x" * 10)
        rejected = conn.read_response("POST")
        closed = conn.wait_closed()

    assert rejected.status == 400, rejected.describe()
    assert rejected.header("Connection") == "close"
    assert closed == b""
    assert request(proxy.port("strict"), target=CANARY).status == 200
    assert _targets(upstream) == [CANARY]


def test_pipelined_canary_after_rejection(
    proxy: PgproxyProcess, upstream: Upstream
) -> None:
    with RawConnection(proxy.port("strict")) as conn:
        conn.send(
            build_request("GET", "/admin%2Fx")
            + build_request("GET", "/admin\\x")
            + build_request("GET", CANARY)
        )
        statuses = [conn.read_response().status for _ in range(3)]

    assert statuses == [400, 400, 200]
    assert _targets(upstream) == [CANARY]


def test_reload_applies_to_open_connections(
    pgproxy_factory: PgproxyFactory, upstream_factory: UpstreamFactory
) -> None:
    upstream = upstream_factory("all")
    process = pgproxy_factory(_config(upstream, strict_paths="[]"))
    with RawConnection(process.port("strict")) as conn:
        conn.send(build_request("GET", "/admin;before"))
        assert conn.read_response().status == 200

        start = len(process.stderr_lines)
        _replace(process.config_path, _config(upstream, strict_paths='["semicolon"]'))
        process.signal(signal.SIGHUP)
        assert process.wait_for_stderr("reloaded", timeout=10.0, start=start)

        conn.send(build_request("GET", "/admin;after"))
        rejected = conn.read_response()
        conn.send(build_request("GET", CANARY))
        canary = conn.read_response()

    assert rejected.status == 400, rejected.describe()
    assert canary.status == 200, canary.describe()
    assert _targets(upstream) == ["/admin;before", CANARY]


def _replace(path: Path, text: str) -> None:
    """Write a new config the way deploy tools do: a new file renamed over."""
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)
