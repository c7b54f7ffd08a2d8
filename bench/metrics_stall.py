"""Measure how long a /metrics scrape stalls the event loop of one `pgproxy run`.

    python bench/metrics_stall.py [--clusters 300] [--per-cluster 5]
                                  [--scrapes 40] [--samples 3000]

Serves a config of CLUSTERS clusters of PER_CLUSTER endpoints (one route
per cluster) in this process, as single-process `pgproxy run` does, with the
admin listener on. A probe task on the same event loop sleeps 1 ms in a
loop and records how much later than asked it woke up. That lateness is the
time the loop spent on something else, which a proxied request would wait
through too. It prints the maximum, the 99th percentile and the median of
the lateness, first for SAMPLES sleeps while nothing is scraped, then while
another process scrapes /metrics SCRAPES times back to back (at most
`SCRAPED_LIMIT_S` seconds).

Endpoint N of each cluster is port N of one upstream process on 127.0.0.1
(PER_CLUSTER ports), and one request per route is sent first, so every
route and endpoint has samples. This is a wall-clock measurement: run it on
a quiet machine and compare runs taken on the same machine only.
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.to_thread

from pgproxy.graph.types import Listener
from pgproxy.proxy.service import ProxyService
from pgproxy.server.admin import AdminServer
from pgproxy.server.listeners import BoundListener, bind_listeners
from pgproxy.server.loading import load_config
from pgproxy.server.operations import OperationsSettings
from pgproxy.server.runtime import event_loop_options, serve

PROBE_SLEEP_S = 0.001
SCRAPED_LIMIT_S = 300.0

# One process with argv[1] listening ports; 200 with a 2-byte body to every request.
UPSTREAM_SCRIPT = """
import asyncio, sys

REPLY = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok"

class Reply(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""
    def data_received(self, data):
        self.buffer += data
        while b"\\r\\n\\r\\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\\r\\n\\r\\n")
            self.transport.write(REPLY)

async def main(count):
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Reply, "127.0.0.1", 0) for _ in range(count)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print(" ".join(map(str, ports)), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)

asyncio.run(main(int(sys.argv[1])))
"""

# Scrapes /metrics COUNT times over one keep-alive connection, then exits.
SCRAPER_SCRIPT = """
import http.client, sys
connection = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=30)
for _ in range(int(sys.argv[2])):
    connection.request("GET", "/metrics")
    response = connection.getresponse()
    assert response.status == 200, response.status
    response.read()
"""


def build_config(clusters: int, per_cluster: int, ports: Sequence[int]) -> str:
    """Return a config with one route and `per_cluster` endpoints per cluster."""
    lines = [
        "[server]",
        'admin = "127.0.0.1:0"',
        'access_log = "off"',
        "",
        "[listeners.main]",
        'address = "127.0.0.1:0"',
        "",
    ]
    for index in range(clusters):
        lines += ["[[routes]]", f'path_prefix = "/c{index}"', f'cluster = "c{index}"']
    for index in range(clusters):
        # An endpoint's identity is (cluster, address), so clusters may share
        # the upstream's ports.
        endpoints = ", ".join(
            f'"127.0.0.1:{ports[slot]}"' for slot in range(per_cluster)
        )
        lines += [f"[clusters.c{index}]", f"endpoints = [{endpoints}]"]
    return "\n".join(lines) + "\n"


def send_one_per_route(port: int, clusters: int) -> None:
    """Send one GET per route over one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for index in range(clusters):
        connection.request("GET", f"/c{index}/x")
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"route /c{index} returned status {response.status}")
    connection.close()


async def probe_lateness(samples: int, stop: anyio.Event | None = None) -> list[float]:
    """Sleep 1 ms `samples` times (or until `stop`); return each wake-up's delay."""
    delays = []
    for _ in range(samples):
        started = time.perf_counter()
        await anyio.sleep(PROBE_SLEEP_S)
        delays.append(time.perf_counter() - started - PROBE_SLEEP_S)
        if stop is not None and stop.is_set():
            break
    return delays


def describe(name: str, delays: list[float]) -> str:
    """Return one line with the count, maximum, p99 and median of `delays`, in ms."""
    if len(delays) > 1:
        p99 = statistics.quantiles(delays, n=100, method="inclusive")[98]
    else:
        p99 = delays[0]
    return (
        f"{name}: {len(delays)} samples, max lateness {max(delays) * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, median {statistics.median(delays) * 1000:.1f} ms"
    )


async def measure(args: argparse.Namespace, config: Path) -> None:
    """Serve `config`, then probe the loop idle and while /metrics is scraped."""
    loaded, _ = load_config(str(config))
    listeners = bind_listeners(loaded.graph)
    admin = AdminServer(loaded.graph.server.admin or "127.0.0.1:0")
    admin.bind()
    settings = OperationsSettings(
        config_path=str(config),
        loaded=loaded,
        bind=_no_bind,
        admin=admin,
        sighup=False,
    )
    ready = anyio.Event()
    stop = anyio.Event()

    def on_ready(_service: ProxyService, _bound: Sequence[BoundListener]) -> None:
        ready.set()

    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: serve(
                loaded.graph,
                shutdown_trigger=stop.wait,
                listeners=listeners,
                on_ready=on_ready,
                operations=settings,
            )
        )
        await ready.wait()
        port = listeners[0].sock.getsockname()[1]
        admin_port = int(admin.bound_address.rpartition(":")[2])
        await anyio.to_thread.run_sync(send_one_per_route, port, args.clusters)
        # The first scrape also imports prometheus-client; it is not measured.
        await anyio.run_process(
            [sys.executable, "-c", SCRAPER_SCRIPT, str(admin_port), "1"]
        )
        print(describe("idle", await probe_lateness(args.samples)))
        print(describe("scraped", await _probe_while_scraped(args, admin_port)))
        stop.set()


async def _probe_while_scraped(
    args: argparse.Namespace, admin_port: int
) -> list[float]:
    done = anyio.Event()
    command = [sys.executable, "-c", SCRAPER_SCRIPT, str(admin_port), str(args.scrapes)]
    started = time.perf_counter()
    with anyio.fail_after(SCRAPED_LIMIT_S):
        async with anyio.create_task_group() as group:

            async def scrape() -> None:
                await anyio.run_process(command)
                done.set()

            group.start_soon(scrape)
            # Bounded by the time limit; `done` ends it with the scrapes.
            delays = await probe_lateness(int(SCRAPED_LIMIT_S / PROBE_SLEEP_S), done)
    elapsed = time.perf_counter() - started
    print(f"{args.scrapes} scrapes took {elapsed:.2f} s")
    return delays


def _no_bind(listener: Listener) -> BoundListener:
    raise RuntimeError("this measurement does not reload")


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clusters", type=int, default=300)
    parser.add_argument("--per-cluster", type=int, default=5)
    parser.add_argument("--scrapes", type=int, default=40)
    parser.add_argument("--samples", type=int, default=3000)
    args = parser.parse_args(argv)
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM_SCRIPT, str(args.per_cluster)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert upstream.stdout is not None
        ports = [int(text) for text in upstream.stdout.readline().split()]
        with tempfile.TemporaryDirectory() as folder:
            config = Path(folder) / "stall.toml"
            config.write_text(build_config(args.clusters, args.per_cluster, ports))
            anyio.run(
                measure,
                args,
                config,
                backend="asyncio",
                backend_options=event_loop_options(),
            )
    finally:
        upstream.kill()
        upstream.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
