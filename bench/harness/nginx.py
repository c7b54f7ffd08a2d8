"""nginx as the upstream and as the reference reverse proxy.

The upstream instance serves fixed bodies: 100 bytes from a `return`, 16 KiB
and 1 MiB static files, and a POST endpoint that reads the whole request body
before it responds. The mirror module reads the body in the precontent
phase, before the content phase produces the response. It also runs three one-line
servers for the consistent-hash cluster, each naming itself in its body.

The proxy instance uses one worker, HTTP/1.1 with `keepalive 128` towards the
upstream, 256 KiB body buffers, and the same header work pgproxy does (Host
passed through, X-Forwarded-For and X-Forwarded-Proto set). Both instances run in the
foreground (`daemon off`) so the started pid is the master.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.processes import BenchError, Process, free_port, wait_for_port

SMALL_BODY_BYTES = 100
MEDIUM_BODY_BYTES = 16 * 1024
LARGE_BODY_BYTES = 1024 * 1024
UPLOAD_LOG = "upload-access.log"
RING_SIZE = 3

# Debian puts nginx in /usr/sbin, which is not on a non-root user's PATH.
_NGINX_FALLBACK = Path("/usr/sbin/nginx")


def nginx_binary() -> str | None:
    """Return the path of the nginx binary, or None when it is not installed."""
    found = shutil.which("nginx")
    if found is not None:
        return found
    return str(_NGINX_FALLBACK) if _NGINX_FALLBACK.exists() else None


def ring_body(index: int) -> str:
    """Return the 100-byte body served by ring endpoint `index`."""
    label = f"ring endpoint {index}\n"
    return label + "r" * (SMALL_BODY_BYTES - len(label) - 1) + "\n"


def _small_body() -> str:
    return "s" * (SMALL_BODY_BYTES - 1) + "\n"


def _common(prefix: Path, name: str) -> str:
    temp = prefix / f"{name}-temp"
    return f"""
worker_processes 1;
worker_rlimit_nofile 16384;
pid {prefix / name}.pid;
error_log {prefix / name}-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
"""


@dataclass(frozen=True, slots=True)
class Upstream:
    """The running upstream nginx: its main port and the ring's ports."""

    process: Process
    port: int
    ring_ports: tuple[int, ...]
    prefix: Path

    def upload_log(self) -> Path:
        """Return the access log of completed uploads: `request_length status`."""
        return self.prefix / UPLOAD_LOG


def upstream_config(prefix: Path, port: int, ring_ports: tuple[int, ...]) -> str:
    """Return nginx.conf of the upstream serving the fixed bodies."""
    ring_servers = "".join(
        f"""
    server {{
        listen 127.0.0.1:{ring_port} backlog=4096;
        location / {{ return 200 "{ring_body(index)}"; }}
    }}"""
        for index, ring_port in enumerate(ring_ports)
    )
    return (
        _common(prefix, "upstream")
        + f"""
    sendfile on;
    log_format upload "$request_length $status";
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {prefix / "static"};
        location / {{ return 200 "{_small_body()}"; }}
        location = /16k {{ }}
        location = /1m {{ }}
        location = /upload {{
            client_max_body_size 2m;
            client_body_buffer_size 2m;
            mirror /discard;
            mirror_request_body on;
            # The static handler returns 405 for a POST on an existing file.
            # The body has been read by then, so that 405 becomes the 200.
            error_page 405 =200 @uploaded;
        }}
        location = /discard {{ internal; return 204; }}
        location @uploaded {{
            access_log {prefix / UPLOAD_LOG} upload;
            return 200 "uploaded\\n";
        }}
    }}{ring_servers}
}}
"""
    )


def proxy_config(prefix: Path, port: int, upstream: Upstream) -> str:
    """Return nginx.conf of the reverse proxy in front of the upstream."""
    ring = "".join(f"server 127.0.0.1:{p}; " for p in upstream.ring_ports)
    return (
        _common(prefix, "nginx-proxy")
        + f"""
    client_max_body_size 2m;
    upstream single {{
        server 127.0.0.1:{upstream.port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    upstream ring {{
        hash $arg_k consistent;
        {ring}
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        # pgproxy streams request bodies, so nginx does too.
        proxy_request_buffering off;
        # With the 4 KiB/8 KiB default buffers nginx moved 1 MiB bodies
        # 35-60 % slower on a 2-core AMD EPYC virtual machine, so pgproxy is
        # compared with the faster setting.
        client_body_buffer_size 256k;
        proxy_buffer_size 256k;
        proxy_buffers 8 256k;
        proxy_busy_buffers_size 512k;
        location / {{ proxy_pass http://single; }}
        location /hash {{ proxy_pass http://ring; }}
    }}
}}
"""
    )


def _write_static(prefix: Path) -> None:
    static = prefix / "static"
    static.mkdir(exist_ok=True)
    (static / "16k").write_bytes(b"m" * MEDIUM_BODY_BYTES)
    (static / "1m").write_bytes(b"l" * LARGE_BODY_BYTES)
    # Only opened to produce the 405 that the upload location turns into 200.
    (static / "upload").write_bytes(b"")


def _start(name: str, prefix: Path, config: str, port: int, cpu: int | None) -> Process:
    binary = nginx_binary()
    if binary is None:
        raise BenchError("nginx is not installed")
    conf = prefix / f"{name}.conf"
    conf.write_text(config)
    (prefix / f"{name}-temp").mkdir(exist_ok=True)
    command = [
        binary,
        "-p", str(prefix),
        "-c", str(conf),
        "-e", str(prefix / f"{name}-error.log"),
        "-g", "daemon off;",
    ]  # fmt: skip
    process = Process(name, command, prefix, cpu=cpu)
    try:
        wait_for_port(process, port)
    except BenchError:
        process.stop()
        raise
    return process


def start_upstream(prefix: Path, cpu: int | None) -> Upstream:
    """Start the upstream nginx with its fixed bodies and three ring servers."""
    _write_static(prefix)
    port = free_port()
    ring_ports = tuple(free_port() for _ in range(RING_SIZE))
    config = upstream_config(prefix, port, ring_ports)
    process = _start("upstream", prefix, config, port, cpu)
    for ring_port in ring_ports:
        wait_for_port(process, ring_port)
    return Upstream(process, port, ring_ports, prefix)


def start_proxy(
    prefix: Path, upstream: Upstream, cpu: int | None
) -> tuple[Process, int]:
    """Start nginx as the reverse proxy; return the process and its port."""
    port = free_port()
    process = _start(
        "nginx-proxy", prefix, proxy_config(prefix, port, upstream), port, cpu
    )
    return process, port


def nginx_version() -> str:
    """Return `nginx -v` output, such as "nginx/1.22.1"."""
    binary = nginx_binary()
    if binary is None:
        return "not installed"
    result = subprocess.run(
        [binary, "-v"], capture_output=True, text=True, timeout=10, check=False
    )
    return result.stderr.strip().removeprefix("nginx version: ")
