"""The health record of one endpoint and the status changes it reports.

`EndpointHealth` contains the counters of one endpoint; only `HealthTable`
(pgproxy.health.state) mutates it. Its status at a given time is derived
from the active verdict and the ejection deadline, with a failed active
check outranking an ejection.

This module is sans-IO.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pgproxy.graph.types import Endpoint


class Status(str, enum.Enum):
    """Health of one endpoint, as used by the data plane."""

    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # failed its active checks
    EJECTED = "ejected"  # removed by outlier detection for a while


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of an endpoint's status, with the reason, for the caller to log."""

    endpoint: Endpoint
    old: Status
    new: Status
    reason: str

    @property
    def went_down(self) -> bool:
        """Whether the endpoint stopped serving with this change."""
        return self.old is Status.HEALTHY and self.new is not Status.HEALTHY

    @property
    def came_back(self) -> bool:
        """Whether the endpoint serves again after this change."""
        return self.new is Status.HEALTHY


class EndpointHealth:
    """Mutable health record of one endpoint; `HealthTable` owns and mutates it."""

    __slots__ = (
        "consecutive_failures",
        "consecutive_probe_failures",
        "consecutive_probe_successes",
        "ejected_until",
        "ejection_ended_at",
        "ejections",
        "endpoint",
        "healthy",
        "reason",
        "since",
        "status",
        "success_reported",
    )

    def __init__(self, endpoint: Endpoint, now: float) -> None:
        self.endpoint = endpoint
        self.healthy = True  # by active checks
        self.consecutive_probe_successes = 0
        self.consecutive_probe_failures = 0
        self.consecutive_failures = 0  # passive: real traffic
        self.ejected_until = 0.0  # 0.0 when no ejection is running
        self.ejection_ended_at = 0.0
        self.ejections = 0  # multiplier of the next ejection time, after decay
        self.status = Status.HEALTHY  # last status reported in a Transition
        self.reason = ""
        self.since = now
        # Whether the outcome report being collected ends with a success, so
        # later successes add nothing to it (see pgproxy.health.reports).
        self.success_reported = False

    def copy_from(self, other: EndpointHealth) -> None:
        """Take over every counter of `other` (same endpoint in an older table).

        `success_reported` is not taken: the report flag belongs to the report
        that set it, which clears it on the old record only.
        """
        # Field by field: a class compiled by mypyc has no __slots__ to loop over.
        self.healthy = other.healthy
        self.consecutive_probe_successes = other.consecutive_probe_successes
        self.consecutive_probe_failures = other.consecutive_probe_failures
        self.consecutive_failures = other.consecutive_failures
        self.ejected_until = other.ejected_until
        self.ejection_ended_at = other.ejection_ended_at
        self.ejections = other.ejections
        self.status = other.status
        self.reason = other.reason
        self.since = other.since

    def current_status(self, now: float) -> Status:
        """Return the status at `now`; active failure outranks ejection."""
        if not self.healthy:
            return Status.UNHEALTHY
        if self.ejected_until and now < self.ejected_until:
            return Status.EJECTED
        return Status.HEALTHY

    def decayed_ejections(self, now: float, base_ejection_time: float) -> int:
        """Return the ejection multiplier after decay for the good time so far."""
        if self.ejections == 0 or base_ejection_time <= 0:
            return self.ejections
        ended_at = self.ejected_until or self.ejection_ended_at
        if now < ended_at:
            return self.ejections
        good_periods = int((now - ended_at) // base_ejection_time)
        return max(0, self.ejections - good_periods)
