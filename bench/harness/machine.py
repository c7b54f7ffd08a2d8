"""Describe the machine and install nginx and wrk when they are missing."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from importlib import metadata

from harness.nginx import nginx_binary, nginx_version
from harness.pgproxy import pgproxy_version, request_path
from harness.processes import BenchError
from harness.wrk import wrk_binary

_PACKAGES = ("nginx-light", "wrk")


def ensure_tools() -> None:
    """Install nginx and wrk with apt-get when missing and running as root.

    Raises BenchError with the install command when a tool is missing and
    the harness cannot install it itself.
    """
    missing = [
        name
        for name, found in (("nginx", nginx_binary()), ("wrk", wrk_binary()))
        if found is None
    ]
    if not missing:
        return
    hint = f"apt-get install -y {' '.join(_PACKAGES)}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(
            f"missing {', '.join(missing)}: install them (on Debian or Ubuntu: "
            f"sudo {hint}) and run the benchmark again"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", *_PACKAGES],
    ):
        subprocess.run(command, env=env, check=True, timeout=900)
    # The package starts a system nginx on port 80; the benchmark starts its own.
    if shutil.which("systemctl"):
        subprocess.run(
            ["systemctl", "stop", "nginx"], check=False, timeout=60, capture_output=True
        )
    if nginx_binary() is None or wrk_binary() is None:
        raise BenchError(f"{hint} finished but nginx or wrk is still missing")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _wrk_version() -> str:
    binary = wrk_binary()
    if binary is None:
        return "not installed"
    result = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    first = (result.stdout or result.stderr).splitlines()[:1]
    return first[0].split(" Copyright")[0].strip() if first else "unknown"


def describe() -> dict[str, str]:
    """Return the facts that make a benchmark result reproducible."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "CPUs (nproc)": str(os.cpu_count()),
        "CPU model": _cpu_model(),
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "uvloop": _package_version("uvloop"),
        "httptools": _package_version("httptools"),
        "pgproxy": pgproxy_version(),
        "pgproxy request path": request_path(),
        "nginx": nginx_version(),
        "wrk": _wrk_version(),
    }
