"""Read memory, CPU time and TCP sockets of running processes from /proc.

Every reader takes pids of processes the harness started. A process that
exits between listing and reading is skipped instead of raising, because
workers may come and go while a benchmark runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_TCP_ESTABLISHED = "01"
_TCP_LISTEN = "0A"


@dataclass(frozen=True, slots=True)
class TreeMemory:
    """Memory of a process tree in KiB: sums and the largest single process."""

    processes: int
    rss_total_kib: int
    rss_max_kib: int
    hwm_total_kib: int
    hwm_max_kib: int


def _parent_pid(pid: int) -> int | None:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses, so fields are
    # counted from the last closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1])


def process_tree(root: int) -> list[int]:
    """Return `root` and all its live descendants, root first."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        parent = _parent_pid(int(entry.name))
        if parent is not None:
            children.setdefault(parent, []).append(int(entry.name))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return [pid for pid in tree if (_PROC / str(pid)).exists()]


def status_kib(pid: int, field: str) -> int:
    """Return a `kB` field of /proc/PID/status (VmRSS, VmHWM), 0 if missing."""
    try:
        lines = (_PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return 0
    prefix = field + ":"
    for line in lines:
        if line.startswith(prefix):
            return int(line.split()[1])
    return 0


def tree_memory(root: int) -> TreeMemory:
    """Read VmRSS and VmHWM of every process in the tree under `root`."""
    pids = process_tree(root)
    rss = [status_kib(pid, "VmRSS") for pid in pids]
    hwm = [status_kib(pid, "VmHWM") for pid in pids]
    return TreeMemory(
        processes=len(pids),
        rss_total_kib=sum(rss),
        rss_max_kib=max(rss, default=0),
        hwm_total_kib=sum(hwm),
        hwm_max_kib=max(hwm, default=0),
    )


def cpu_seconds(pid: int) -> float:
    """Return user plus system CPU time of one process, in seconds."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of proc(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def start_ticks(pid: int) -> int | None:
    """Return the process's start time in clock ticks since boot, None if gone.

    A pid and its start time together identify one process, even after the
    pid is reused.
    """
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # starttime is field 22 of proc(5).
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def tree_cpu_seconds(root: int) -> dict[int, float]:
    """Return CPU seconds per process of the tree under `root`."""
    return {pid: cpu_seconds(pid) for pid in process_tree(root)}


def socket_inodes(pid: int) -> set[int]:
    """Return the inodes of every socket the process has open."""
    inodes: set[int] = set()
    fd_dir = _PROC / str(pid) / "fd"
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_inodes(local_port: int, state: str) -> set[int]:
    """Return inodes of TCP sockets bound to `local_port` in a proc(5) state."""
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port == local_port and fields[3] == state:
                inodes.add(int(fields[9]))
    return inodes


def established_per_process(pids: list[int], local_port: int) -> dict[int, int]:
    """Count established connections on `local_port` held by each process."""
    established = tcp_inodes(local_port, _TCP_ESTABLISHED)
    return {pid: len(socket_inodes(pid) & established) for pid in pids}


def listening_processes(root: int, local_port: int) -> list[int]:
    """Return the processes under `root` holding a listening socket on the port."""
    listening = tcp_inodes(local_port, _TCP_LISTEN)
    return [pid for pid in process_tree(root) if socket_inodes(pid) & listening]
