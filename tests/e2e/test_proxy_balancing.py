"""Endpoint selection and upstream pools through a real pgproxy process.

Each cluster in the module's config belongs to exactly one test, so every
test starts with fresh balancer state even though the process is shared.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from e2e_client import RawConnection, build_request, echo_of, request
from e2e_process import PgproxyFactory, PgproxyProcess
from e2e_upstream import (
    ReceivedRequest,
    Upstream,
    UpstreamConnection,
    UpstreamFactory,
    close_later,
    echo,
)

CONFIG = """
[server]
access_log = "json"
drain_timeout = "2s"

[listeners.main]
address = "127.0.0.1:0"

[[routes]]
path_prefix = "/rr"
cluster = "rr"

[[routes]]
path_prefix = "/weighted"
cluster = "weighted"

[[routes]]
path_prefix = "/hash"
cluster = "hash"

[[routes]]
path_prefix = "/qhash"
cluster = "qhash"

[[routes]]
path_prefix = "/least"
cluster = "least"

[[routes]]
path_prefix = "/random"
cluster = "random"

[[routes]]
path_prefix = "/capped"
cluster = "capped"

[[routes]]
path_prefix = "/reuse"
cluster = "reuse"

[[routes]]
path_prefix = "/expiry"
cluster = "expiry"

[[routes]]
path_prefix = "/stale"
cluster = "stale"

[clusters.rr]
endpoints = ["{r1}", "{r2}", "{r3}"]

[clusters.weighted]
endpoints = [{{ address = "{w1}", weight = 2 }}, "{w2}"]

[clusters.hash]
endpoints = ["{h1}", "{h2}", "{h3}"]
balancer = "consistent_hash"
hash_key = "header:x-user"

[clusters.qhash]
endpoints = ["{q1}", "{q2}", "{q3}"]
balancer = "consistent_hash"
hash_key = "query:k"

[clusters.least]
endpoints = ["{l1}", "{l2}", "{l3}"]
balancer = "least_request"

[clusters.random]
endpoints = ["{n1}", "{n2}", "{n3}"]
balancer = "random"

[clusters.capped]
endpoints = ["{capped}"]
max_idle_connections = 1

[clusters.reuse]
endpoints = ["{reuse}"]

[clusters.expiry]
endpoints = ["{expiry}"]
pool_idle_timeout = "500ms"

[clusters.stale]
endpoints = ["{stale}"]
pool_idle_timeout = "30s"
"""

HASH_CONFIG = """
[listeners.main]
address = "127.0.0.1:0"

[[routes]]
path_prefix = "/hash"
cluster = "hash"

[clusters.hash]
endpoints = [{endpoints}]
balancer = "consistent_hash"
hash_key = "header:x-user"
"""

NAMES = [
    *(
        "r1",
        "r2",
        "r3",
        "w1",
        "w2",
        "h1",
        "h2",
        "h3",
        "q1",
        "q2",
        "q3",
        "l1",
        "l2",
        "l3",
        "n1",
        "n2",
        "n3",
    ),
    *("reuse", "expiry", "stale", "capped"),
]


@pytest.fixture(scope="module")
def upstreams(module_upstream_factory: UpstreamFactory) -> dict[str, Upstream]:
    return {name: module_upstream_factory(name) for name in NAMES}


@pytest.fixture(scope="module")
def proxy(
    module_pgproxy_factory: PgproxyFactory, upstreams: dict[str, Upstream]
) -> PgproxyProcess:
    return module_pgproxy_factory(
        CONFIG.format(**{n: u.address for n, u in upstreams.items()})
    )


@pytest.fixture(autouse=True)
def fresh_upstreams(upstreams: dict[str, Upstream]) -> Iterator[None]:
    for upstream in upstreams.values():
        upstream.reset()
    yield


def picks(
    port: int, target: str, count: int, headers: list[tuple[str, str]] | None = None
) -> list[str]:
    """Send `count` requests on one connection; return the upstream of each."""
    answered = []
    with RawConnection(port) as conn:
        for _ in range(count):
            conn.send(build_request("GET", target, headers=headers))
            answered.append(echo_of(conn.read_response())["upstream"])
    return answered


def test_round_robin_even(proxy: PgproxyProcess) -> None:
    order = picks(proxy.port(), "/rr", 30)
    assert Counter(order) == {"r1": 10, "r2": 10, "r3": 10}, (
        f"uneven round robin: {order}"
    )
    for start in range(0, 30, 3):
        assert len(set(order[start : start + 3])) == 3, (
            f"round robin repeated an endpoint: {order}"
        )


def test_round_robin_across_connections(proxy: PgproxyProcess) -> None:
    order = [
        echo_of(request(proxy.port(), "GET", "/rr/new"))["upstream"] for _ in range(9)
    ]
    assert Counter(order) == {"r1": 3, "r2": 3, "r3": 3}, f"uneven round robin: {order}"


def test_weighted_round_robin_is_smooth(proxy: PgproxyProcess) -> None:
    order = picks(proxy.port(), "/weighted", 30)
    assert Counter(order) == {"w1": 20, "w2": 10}, f"weights 2:1 not honoured: {order}"
    assert order[:3] == ["w1", "w2", "w1"], (
        f"smooth weighted round robin gives A B A, got {order[:3]}"
    )
    assert order == order[:3] * 10, f"the weighted sequence is not periodic: {order}"


@pytest.mark.parametrize(
    ("target", "names"),
    [("/least", {"l1", "l2", "l3"}), ("/random", {"n1", "n2", "n3"})],
)
def test_other_balancers_spread(
    proxy: PgproxyProcess, target: str, names: set[str]
) -> None:
    # 30 requests leave one of 3 endpoints unused with probability below 1e-4.
    answered = Counter(picks(proxy.port(), target, 30))
    assert set(answered) == names, f"{target} did not use every endpoint: {answered}"


def hash_picks(port: int, keys: list[str]) -> dict[str, str]:
    """Return the upstream that served each key, one request per key."""
    return {key: picks(port, "/hash", 1, [("X-User", key)])[0] for key in keys}


KEYS = [f"user-{index}" for index in range(60)]


def test_consistent_hash_same_key_same_endpoint(proxy: PgproxyProcess) -> None:
    for key in ("alice", "bob", "carol"):
        answered = picks(proxy.port(), "/hash", 10, [("X-User", key)])
        assert len(set(answered)) == 1, f"key {key} moved between endpoints: {answered}"


def test_consistent_hash_spreads_keys(proxy: PgproxyProcess) -> None:
    spread = Counter(hash_picks(proxy.port(), KEYS).values())
    assert set(spread) == {"h1", "h2", "h3"}, (
        f"60 keys did not reach all 3 endpoints: {spread}"
    )


def test_consistent_hash_missing_key_round_robin(proxy: PgproxyProcess) -> None:
    answered = picks(proxy.port(), "/hash/no-key", 6)
    assert set(answered) == {"h1", "h2", "h3"}, (
        f"requests without the key should spread: {answered}"
    )


def test_query_hash_key_like_nginx_arg(proxy: PgproxyProcess) -> None:
    """The first k argument picks the endpoint, whatever its position and case."""
    port = proxy.port()
    spread = Counter(picks(port, f"/qhash?k={key}", 1)[0] for key in KEYS)
    assert set(spread) == {"q1", "q2", "q3"}, (
        f"60 query keys did not reach all 3 endpoints: {spread}"
    )
    for key in KEYS[:10]:
        first = picks(port, f"/qhash?k={key}", 1)[0]
        same = picks(port, f"/qhash/x?a=1&K={key}&k=other", 3)
        assert same == [first] * 3, f"key {key} moved with its position: {same}"


def test_query_hash_missing_key_round_robin(proxy: PgproxyProcess) -> None:
    answered = picks(proxy.port(), "/qhash?kk=1&k=", 6)
    assert set(answered) == {"q1", "q2", "q3"}, (
        f"requests without the key should spread: {answered}"
    )


def test_consistent_hash_stable_across_processes(
    proxy: PgproxyProcess,
    upstreams: dict[str, Upstream],
    pgproxy_factory: PgproxyFactory,
) -> None:
    """Reordering endpoints keeps every key; removing one moves only its keys."""
    mapping = hash_picks(proxy.port(), KEYS)
    addresses = {name: upstreams[name].address for name in ("h1", "h2", "h3")}

    reordered = ", ".join(f'"{addresses[n]}"' for n in ("h3", "h1", "h2"))
    other = pgproxy_factory(HASH_CONFIG.format(endpoints=reordered))
    assert hash_picks(other.port(), KEYS) == mapping, "reordering endpoints moved keys"

    without_h2 = ", ".join(f'"{addresses[n]}"' for n in ("h1", "h3"))
    smaller = pgproxy_factory(HASH_CONFIG.format(endpoints=without_h2))
    after = hash_picks(smaller.port(), KEYS)
    moved = [key for key in KEYS if mapping[key] != "h2" and after[key] != mapping[key]]
    assert moved == [], f"removing h2 moved keys that were not on h2: {moved}"


def test_connection_reuse(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    upstream = upstreams["reuse"]
    with RawConnection(proxy.port()) as conn:
        for index in range(50):
            conn.send(build_request("GET", f"/reuse/{index}"))
            echo_of(conn.read_response())
    for index in range(50):
        echo_of(request(proxy.port(), "GET", f"/reuse/new/{index}"))
    assert len(upstream.requests) == 100
    assert upstream.connections_accepted <= 3, (
        f"100 sequential requests opened {upstream.connections_accepted} upstream "
        "connections; "
        "pooled keep-alive connections should be reused"
    )


def test_pool_idle_expiry(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    upstream = upstreams["expiry"]
    echo_of(request(proxy.port(), "GET", "/expiry"))
    deadline = time.monotonic() + 5
    while upstream.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.open_connections == 0, (
        "pgproxy kept an idle upstream connection open for 5s with pool_idle_timeout "
        "= 500ms"
    )


def test_stale_pooled_connection_not_used(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    """An upstream that closes idle connections silently causes no errors."""
    upstream = upstreams["stale"]
    upstream.handler = close_later(0.1)
    for index in range(5):
        response = request(proxy.port(), "GET", f"/stale/{index}")
        assert response.status == 200, (
            f"request {index} after the upstream closed its idle "
            f"connection:\n{response.describe()}"
        )
        time.sleep(0.4)
    assert len(upstream.requests) == 5, (
        "each request should reach the upstream exactly once"
    )


def test_pool_keeps_max_idle_connections(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream]
) -> None:
    """Three concurrent requests need three connections; one stays pooled."""
    upstream = upstreams["capped"]
    barrier = threading.Barrier(3, timeout=10)

    def together(request: ReceivedRequest, conn: UpstreamConnection) -> bool | None:
        barrier.wait()
        return echo(request, conn)

    upstream.handler = together
    with ThreadPoolExecutor(3) as pool:
        futures = [
            pool.submit(request, proxy.port(), "GET", f"/capped/{index}")
            for index in range(3)
        ]
        responses = [future.result(timeout=15) for future in futures]
    assert [r.status for r in responses] == [200, 200, 200]
    assert upstream.connections_accepted == 3

    deadline = time.monotonic() + 5
    while upstream.open_connections > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.open_connections == 1, (
        f"{upstream.open_connections} idle upstream connections stayed open with "
        "max_idle_connections = 1"
    )


NGINX_CONFIG = """
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    upstream hashed {{
        hash $http_x_user consistent;
{servers}
    }}
    server {{
        listen unix:{directory}/nginx.sock;
        location / {{ proxy_pass http://hashed; }}
    }}
}}
"""


def nginx_pick(socket_path: Path, key: str) -> str:
    """Return the upstream nginx picks for X-User `key`, sent over a Unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(socket_path))
        sock.sendall(
            f"GET /hash HTTP/1.1\r\nHost: t\r\nX-User: {key}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.lower() == "x-upstream":
            return value.strip()
    raise AssertionError(f"nginx response without X-Upstream: {data[:300]!r}")


@pytest.mark.nginx
def test_consistent_hash_matches_nginx(
    proxy: PgproxyProcess, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    """The same keys and endpoints pick the same endpoint as nginx's ketama ring."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed")
    servers = "\n".join(
        f"        server {upstreams[name].address};" for name in ("h1", "h2", "h3")
    )
    config = tmp_path / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(directory=tmp_path, servers=servers))
    process = subprocess.Popen(
        [
            nginx,
            "-p",
            str(tmp_path),
            "-c",
            str(config),
            "-e",
            str(tmp_path / "error.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        socket_path = tmp_path / "nginx.sock"
        deadline = time.monotonic() + 10
        while not socket_path.exists() and process.poll() is None:
            assert time.monotonic() < deadline, "nginx did not create its socket in 10s"
            time.sleep(0.05)
        assert process.poll() is None, (
            f"nginx exited: {(tmp_path / 'error.log').read_text()}"
        )
        expected = {key: nginx_pick(socket_path, key) for key in KEYS}
    finally:
        process.terminate()
        process.wait(10)
    assert hash_picks(proxy.port(), KEYS) == expected, "pgproxy and nginx disagree"
