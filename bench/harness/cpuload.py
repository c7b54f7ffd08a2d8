"""CPU time on the two benchmark cores, split into ours and everyone else's.

On a shared machine other programs may run on the cores the benchmark
pinned its processes to. Busy time per core comes from /proc/stat, and the
benchmark's own share from its processes (proxy, upstream and wrk). The rest
is "other load", reported beside each result so that a disturbed run shows.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass

from harness import procfs

logger = logging.getLogger(__name__)

QUIET_BUSY_PCT = 15.0
_QUIET_WINDOW_S = 0.5


def core_busy_s(cpu: int) -> float:
    """Return the busy time of one core since boot from /proc/stat, in seconds."""
    prefix = f"cpu{cpu} "
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(prefix):
                ticks = [int(value) for value in line.split()[1:]]
                # Fields 4 and 5 are idle and iowait. Steal (8) counts as busy
                # because another guest had the core.
                return (sum(ticks) - ticks[3] - ticks[4]) / procfs.CLOCK_TICKS
    raise ValueError(f"core {cpu} is not listed in /proc/stat")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(cores: tuple[int, ...], max_wait_s: float) -> float:
    """Wait up to `max_wait_s` until every core is below 15 % busy.

    Returns the seconds waited. Busy time is sampled over half-second
    windows, so the wait ends at most half a second after the cores go quiet.
    """
    started = time.monotonic()
    while True:
        before = [core_busy_s(cpu) for cpu in cores]
        time.sleep(_QUIET_WINDOW_S)
        after = [core_busy_s(cpu) for cpu in cores]
        busiest = max(
            100.0 * (end - start) / _QUIET_WINDOW_S
            for end, start in zip(after, before, strict=True)
        )
        waited = time.monotonic() - started
        if busiest < QUIET_BUSY_PCT:
            return waited
        if waited >= max_wait_s:
            logger.warning(
                "cores %s still %.0f %% busy after %.0f s; measuring anyway",
                cores, busiest, waited,
            )  # fmt: skip
            return waited


@dataclass(frozen=True, slots=True)
class _Snapshot:
    proxy_core_s: float
    load_core_s: float
    proxy_s: float
    upstream_s: float
    children_s: float


@dataclass(frozen=True, slots=True)
class OtherLoad:
    """CPU used during a run, in percent of one core.

    `proxy_core_pct` and `load_core_pct` are other programs' use of each
    core; `load_core_ours_pct` is wrk's and the upstream's.
    """

    proxy_core_pct: float
    load_core_pct: float
    load_core_ours_pct: float


class LoadAccounting:
    """Split each core's busy time during a run into ours and other programs'.

    Take `start()` right before wrk starts and `stop()` right after it exits:
    wrk's CPU time is then the growth of this process's children's usage,
    because wrk is the only child that exits in between.
    """

    def __init__(
        self, proxy_core: int, load_core: int, proxy_pid: int | None, upstream_pid: int
    ) -> None:
        self.proxy_core = proxy_core
        self.load_core = load_core
        self.proxy_pid = proxy_pid
        self.upstream_pid = upstream_pid
        self._start: _Snapshot | None = None

    def _snapshot(self) -> _Snapshot:
        proxy = procfs.tree_cpu_seconds(self.proxy_pid) if self.proxy_pid else {}
        return _Snapshot(
            proxy_core_s=core_busy_s(self.proxy_core),
            load_core_s=core_busy_s(self.load_core),
            proxy_s=sum(proxy.values()),
            upstream_s=sum(procfs.tree_cpu_seconds(self.upstream_pid).values()),
            children_s=_children_cpu_s(),
        )

    def start(self) -> None:
        """Record the counters at the start of the run."""
        self._start = self._snapshot()

    def stop(self, duration_s: float) -> tuple[float, OtherLoad]:
        """Return the proxy's CPU seconds and the other load since `start()`."""
        if self._start is None:
            raise RuntimeError("LoadAccounting.stop() called before start()")
        end, begin = self._snapshot(), self._start
        proxy_s = end.proxy_s - begin.proxy_s
        ours_on_load_core = (end.upstream_s - begin.upstream_s) + (
            end.children_s - begin.children_s
        )
        other_proxy_core = end.proxy_core_s - begin.proxy_core_s - proxy_s
        other_load_core = end.load_core_s - begin.load_core_s - ours_on_load_core
        return proxy_s, OtherLoad(
            proxy_core_pct=max(0.0, 100.0 * other_proxy_core / duration_s),
            load_core_pct=max(0.0, 100.0 * other_load_core / duration_s),
            load_core_ours_pct=100.0 * ours_on_load_core / duration_s,
        )
