"""Count the instructions pgproxy runs per proxied request, under callgrind.

    python bench/instructions.py [--target pgproxy|bare] [--requests N]
                                 [--warmup N] [--path PATH] [--keys N]
                                 [--connections N] [--cache-sim] [--close]

Wall-clock benchmarks on a shared 2-core machine move by several percent
from run to run; instruction counts do not. This starts the benchmark's
upstream nginx and pgproxy's serving process (one worker, access log off)
under `valgrind --tool=callgrind`, with instrumentation off. It sends the
warm-up requests over keep-alive connections (one by default, or
`--connections N` sending at the same time, as wrk does), then counts only
the measured requests and prints user-space instructions per request.
`--cache-sim` also simulates the caches (32 KiB L1 instruction and data
caches, a 512 KiB last level) and prints misses per request: two
programs with the same instruction count can differ in time by their
misses.
`--keys N` appends `k=0` to `k=N-1` to the path's query, cycling per
connection, as the benchmark's hash-3 scenario varies its key (for example
`--path /hash --keys 1024`).
`--close` sends each request on a new connection, to count what a
connection costs. `--target bare` counts bench/bare_proxy.py instead, the
floor of the stack. Use it to compare two commits
(`PYTHONPATH=/other/checkout`); compare counts taken on the same machine and
Python only.

Needs valgrind (Debian package `valgrind`), which also provides
`callgrind_control`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from harness.bare import READY as BARE_READY
from harness.bare import SCRIPT as BARE_SCRIPT
from harness.nginx import Upstream, start_upstream
from harness.pgproxy import pgproxy_config
from harness.processes import BenchError, Process, wait_for_line

_PORT_RE = re.compile(r"listening on (\S+):(\d+)")
_EVENTS_RE = re.compile(r"^events:\s+(.+)$", re.MULTILINE)
_TOTAL_LINE_RE = re.compile(r"^totals:\s+(.+)$", re.MULTILINE)
# Cache geometry for --cache-sim: size, associativity, line size in bytes.
_CACHES = ("--I1=32768,8,64", "--D1=32768,8,64", "--LL=524288,8,64")
READY_TIMEOUT_S = 120.0


def _read_response(sock: socket.socket, pending: bytes) -> bytes:
    """Read one Content-Length framed response; return the bytes after it."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("pgproxy closed the connection")
        pending += chunk
    head, _, rest = pending.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"unexpected response: {head[:80]!r}")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if match is None:
        raise BenchError("response without Content-Length")
    length = int(match.group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("pgproxy closed the connection mid-body")
        rest += chunk
    return rest[length:]


def request_paths(path: str, keys: int) -> list[str]:
    """Return `path`, or with `keys` > 0 one path per key `k=0` to `k=keys-1`."""
    if keys <= 0:
        return [path]
    separator = "&" if "?" in path else "?"
    return [f"{path}{separator}k={key}" for key in range(keys)]


def _send_requests(
    port: int, paths: list[str], count: int, close: bool = False
) -> None:
    """Send `count` requests over one connection, or each on its own one.

    The requests cycle through `paths`.
    """
    if close:
        requests = [
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            for path in paths
        ]
        for i in range(count):
            with socket.create_connection(("127.0.0.1", port), timeout=30.0) as sock:
                sock.sendall(requests[i % len(requests)])
                _read_response(sock, b"")
        return
    requests = [
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        for path in paths
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=30.0) as sock:
        pending = b""
        for i in range(count):
            sock.sendall(requests[i % len(requests)])
            pending = _read_response(sock, pending)


def _send_concurrently(
    port: int, paths: list[str], count: int, connections: int, close: bool = False
) -> None:
    """Send `count` requests from `connections` clients at the same time."""
    errors: list[BaseException] = []

    def send(share: int) -> None:
        try:
            _send_requests(port, paths, share, close)
        except (OSError, BenchError) as exc:
            errors.append(exc)

    shares = [
        count // connections + (i < count % connections) for i in range(connections)
    ]
    threads = [threading.Thread(target=send, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"{len(errors)} client connections failed: {errors[0]}")


def _callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


def _target_command(target: str, upstream: Upstream, workdir: Path) -> list[str]:
    """Return the command that serves `target` in front of `upstream`."""
    if target == "bare":
        upstream_address = f"127.0.0.1:{upstream.port}"
        return [sys.executable, str(BARE_SCRIPT), "--upstream", upstream_address]
    config = workdir / "pgproxy.toml"
    config.write_text(pgproxy_config(upstream, workers=1, access_log="off"))
    return [sys.executable, "-m", "pgproxy.server.main", str(config)]


def count(
    target: str,
    requests: int,
    warmup: int,
    path: str,
    workdir: Path,
    save_to: Path | None = None,
    connections: int = 1,
    cache_sim: bool = False,
    close: bool = False,
    keys: int = 0,
) -> dict[str, int]:
    """Return callgrind's event totals for `requests` requests to `target`.

    The totals are keyed by event name: `Ir` is instructions, and with
    `cache_sim` the cache misses follow (I1mr, D1mr, D1mw, ILmr, DLmr, DLmw).
    With `save_to`, callgrind's output file is copied there, for
    `callgrind_annotate`. With `keys`, the requests cycle through the paths
    of `request_paths`.
    """
    paths = request_paths(path, keys)
    upstream = start_upstream(workdir, cpu=None)
    # %p: a forked child would otherwise write its counts to the same file.
    out_pattern = workdir / "callgrind.out.%p"
    ready = BARE_READY if target == "bare" else "pgproxy ready"
    try:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            *(("--cache-sim=yes", *_CACHES) if cache_sim else ()),
            f"--callgrind-out-file={out_pattern}",
            *_target_command(target, upstream, workdir),
        ]
        proxy = Process(target, command, workdir)
        try:
            lines = wait_for_line(proxy, ready, timeout_s=READY_TIMEOUT_S)
            port = next(
                int(match.group(2)) for match in map(_PORT_RE.search, lines) if match
            )
            _send_concurrently(port, paths, warmup, connections, close)
            _callgrind_control("--instr=on", str(proxy.pid))
            _send_concurrently(port, paths, requests, connections, close)
            _callgrind_control("--instr=off", str(proxy.pid))
        finally:
            proxy.stop(timeout_s=60.0)
    finally:
        upstream.process.stop()
    out_file = workdir / f"callgrind.out.{proxy.pid}"
    if save_to is not None:
        shutil.copyfile(out_file, save_to)
    text = out_file.read_text()
    events = _EVENTS_RE.search(text)
    totals = _TOTAL_LINE_RE.search(text)
    if events is None or totals is None:
        raise BenchError(f"no totals in {out_file}")
    names = events.group(1).split()
    values = [int(value) for value in totals.group(1).split()]
    return dict(zip(names, values, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--path", default="/small")
    parser.add_argument(
        "--keys",
        type=int,
        default=0,
        help="append k=0 to k=N-1 to the path's query, cycling (default 0: none)",
    )
    parser.add_argument("--target", choices=("pgproxy", "bare"), default="pgproxy")
    parser.add_argument(
        "--save", type=Path, help="copy callgrind's output here, for callgrind_annotate"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=1,
        help="keep-alive connections sending at the same time (default 1)",
    )
    parser.add_argument(
        "--cache-sim",
        action="store_true",
        help="also simulate the caches and print misses per request",
    )
    parser.add_argument(
        "--close",
        action="store_true",
        help="send each request on a new connection (Connection: close)",
    )
    options = parser.parse_args()
    if options.connections < 1 or options.connections > options.requests:
        parser.error("--connections must be between 1 and --requests")
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="pgproxy-instr-") as tmp:
        totals = count(
            options.target,
            options.requests,
            options.warmup,
            options.path,
            Path(tmp),
            save_to=options.save,
            connections=options.connections,
            cache_sim=options.cache_sim,
            close=options.close,
            keys=options.keys,
        )
    total = totals["Ir"]
    print(
        f"{total:,} instructions for {options.requests:,} requests: "
        f"{total / options.requests:,.0f} per request"
    )
    if options.cache_sim:
        misses = ", ".join(
            f"{name} {totals[name] / options.requests:,.0f}"
            for name in ("I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")
        )
        print(f"cache misses per request: {misses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
