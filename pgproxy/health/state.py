"""Health state of every endpoint: active thresholds and passive ejection.

Invariants kept by this module:
- An endpoint is available when the active checks last judged it healthy and
  no passive ejection is running. Until its first probe result it counts as
  healthy.
- Active state flips only after `healthy_threshold` probe successes or
  `unhealthy_threshold` probe failures in a row.
- Passive ejection (outlier detection) starts after `consecutive_failures`
  connect failures or 502-504 responses in a row; one success resets the
  count. The n-th ejection lasts n x base_ejection_time, capped at
  max_ejection_time. The multiplier decays by one for each
  base_ejection_time that passes after an ejection ends without a new one.
- At most floor(endpoints x max_ejection_percent / 100) endpoints of a cluster
  are ejected at once, raised to one when the percentage is above zero and the
  cluster has two or more endpoints (Envoy's outlier detection also lets a
  first host be ejected whatever the percentage). A single-endpoint cluster is
  ejected only with max_ejection_percent = 100, because ejecting its only
  endpoint turns 502 responses into 503 responses and delays its return. The
  nginx upstream module likewise never marks the only server of a group
  unavailable.
- A failed probe does not extend an ejection and a good probe does not end one:
  ejection ends only when its time is over.
- A table that takes over ejections decided elsewhere (`apply_ejection`, in
  a worker process) ends each one when its time is over as well, so a lost
  message cannot keep an endpoint out for longer.

This module is sans-IO: time comes from the injected clock, and state changes
are returned (or queued) as `Transition` values for the caller to log.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from pgproxy.graph.settings import (
    DEFAULT_HEALTH_CHECK,
    OutlierDetectionSettings,
)
from pgproxy.graph.types import Cluster, Endpoint
from pgproxy.health.endpoint import EndpointHealth, Status, Transition

# EndpointHealth, Status and Transition are defined in pgproxy.health.endpoint
# and imported from here by the rest of the package.
__all__ = [
    "MAX_PENDING_TRANSITIONS",
    "EndpointHealth",
    "HealthTable",
    "Status",
    "Transition",
    "ejection_time",
    "max_ejected",
]

# Queued passive transitions beyond this are dropped and counted, so the queue
# stays bounded when no service pops it.
MAX_PENDING_TRANSITIONS = 1024


def max_ejected(endpoint_count: int, max_ejection_percent: int) -> int:
    """Return how many endpoints of a cluster may be ejected at the same time."""
    allowed = endpoint_count * max_ejection_percent // 100
    if allowed == 0 and max_ejection_percent > 0 and endpoint_count >= 2:
        return 1
    return allowed


def ejection_time(ejections: int, outlier: OutlierDetectionSettings) -> float:
    """Return the length of the `ejections`-th ejection, in seconds."""
    return min(outlier.base_ejection_time * ejections, outlier.max_ejection_time)


class HealthTable:
    """Health of every endpoint of a graph, keyed by (cluster, address).

    `is_available` is on the request path: two dict lookups and a comparison,
    plus a clock read only while an ejection is recorded. Passive outcomes
    queue their transitions; `pop_transitions` hands them to the caller that
    logs them. `record_probe` and `expire_ejections` return theirs directly.
    """

    def __init__(
        self, clusters: Mapping[str, Cluster], clock: Callable[[], float]
    ) -> None:
        self._clock = clock
        self._clusters = dict(clusters)
        now = clock()
        self._states: dict[str, dict[str, EndpointHealth]] = {
            name: {ep.address: EndpointHealth(ep, now) for ep in cluster.endpoints}
            for name, cluster in clusters.items()
        }
        self._pending: deque[Transition] = deque()
        self.dropped_transitions = 0
        self.ejections_total = 0

    def __repr__(self) -> str:
        now = self._clock()
        counts = {status: 0 for status in Status}
        for state in self._iter_states():
            counts[state.current_status(now)] += 1
        return (
            f"<HealthTable clusters={len(self._states)} "
            f"endpoints={sum(counts.values())} healthy={counts[Status.HEALTHY]} "
            f"unhealthy={counts[Status.UNHEALTHY]} ejected={counts[Status.EJECTED]}>"
        )

    def now(self) -> float:
        """Return the table's clock reading, the time base of its deadlines."""
        return self._clock()

    def is_available(self, endpoint: Endpoint) -> bool:
        """Return whether active checks pass and no ejection is running.

        An endpoint the table does not track counts as available.
        """
        try:
            state = self._states[endpoint.cluster][endpoint.address]
        except KeyError:
            return True
        if not state.healthy:
            return False
        return not state.ejected_until or state.ejected_until <= self._clock()

    def all_unavailable(self, cluster: str) -> bool:
        """Return whether no endpoint of `cluster` is available now (O(endpoints))."""
        states = self._states.get(cluster)
        if not states:
            return False
        now = self._clock()
        return all(
            state.current_status(now) is not Status.HEALTHY for state in states.values()
        )

    def record_success(self, endpoint: Endpoint) -> None:
        """Record a good outcome of real traffic: resets the failure count."""
        state = self._state(endpoint)
        if state is not None:
            state.consecutive_failures = 0

    def record_failure(self, endpoint: Endpoint, reason: str, count: int = 1) -> None:
        """Record `count` connect failures or 502-504s in a row from `endpoint`.

        Ejects the endpoint once the failures in a row reach the cluster's
        `consecutive_failures`, unless the cap on ejected endpoints is reached.
        In that case the count stays, so a later failure ejects the endpoint
        once a slot is free. `count` above one has the effect of as many
        calls in a row at the same time, with `reason` as the last one's.
        """
        state = self._state(endpoint)
        if state is None:
            return
        now = self._clock()
        self._queue(self._end_ejection(state, now))
        if state.ejected_until:
            return  # an outcome of a request sent before the ejection
        before = state.consecutive_failures
        state.consecutive_failures += count
        outlier = self._clusters[endpoint.cluster].settings.outlier_detection
        if (
            not outlier.enabled
            or state.consecutive_failures < outlier.consecutive_failures
        ):
            return
        if not self._may_eject(endpoint.cluster, now, outlier):
            return
        # One call at a time would eject at the failure that reaches the
        # threshold and ignore the rest, which come from an ejected endpoint.
        state.consecutive_failures = max(before + 1, outlier.consecutive_failures)
        self._eject(state, now, outlier, reason)

    def record_probe(
        self, endpoint: Endpoint, ok: bool, reason: str
    ) -> Transition | None:
        """Record an active probe result; return the status change it caused."""
        state = self._state(endpoint)
        if state is None:
            return None
        now = self._clock()
        self._queue(self._end_ejection(state, now))
        settings = self._clusters[endpoint.cluster].settings
        check = settings.health_check or DEFAULT_HEALTH_CHECK
        if ok:
            state.consecutive_probe_failures = 0
            state.consecutive_probe_successes += 1
            if not state.healthy and (
                state.consecutive_probe_successes >= check.healthy_threshold
            ):
                state.healthy = True
                count = state.consecutive_probe_successes
                reason = f"{count} probe(s) in a row succeeded"
        else:
            state.consecutive_probe_successes = 0
            state.consecutive_probe_failures += 1
            if state.healthy and (
                state.consecutive_probe_failures >= check.unhealthy_threshold
            ):
                state.healthy = False
                count = state.consecutive_probe_failures
                reason = f"{count} probe(s) in a row failed, last: {reason}"
        return self._settle(state, now, reason)

    def restore_probe_state(
        self,
        endpoint: Endpoint,
        healthy: bool,
        successes: int,
        failures: int,
        reason: str,
    ) -> Transition | None:
        """Take over the active-check state that another table computed.

        Sets the verdict and the probe counts as they are, without thresholds,
        so later `record_probe` calls continue from them. Passive state stays.
        """
        state = self._state(endpoint)
        if state is None:
            return None
        state.healthy = healthy
        state.consecutive_probe_successes = successes
        state.consecutive_probe_failures = failures
        return self._settle(state, self._clock(), reason)

    def ejection_deadline(self, endpoint: Endpoint) -> float:
        """Return when the ejection of `endpoint` ends (clock reading), or 0.0.

        An ejection whose time is over counts until the table ends it
        (`expire_ejections` or the endpoint's next outcome).
        """
        state = self._state(endpoint)
        return 0.0 if state is None else state.ejected_until

    def reason(self, endpoint: Endpoint) -> str:
        """Return the reason of the last status change of `endpoint`."""
        state = self._state(endpoint)
        return "" if state is None else state.reason

    def apply_ejection(
        self, endpoint: Endpoint, remaining: float, reason: str
    ) -> Transition | None:
        """Take over an ejection decided by another table; return the change.

        `remaining` is the seconds the ejection has left; 0 ends any ejection
        of the endpoint now. The ejection counts and the failure count stay
        with the table that decides.
        """
        state = self._state(endpoint)
        if state is None:
            return None
        now = self._clock()
        if remaining > 0:
            state.ejected_until = now + remaining
        elif state.ejected_until:
            state.ejection_ended_at = min(now, state.ejected_until)
            state.ejected_until = 0.0
        return self._settle(state, now, reason)

    def successor(self, clusters: Mapping[str, Cluster]) -> HealthTable:
        """Return a table of the same kind for `clusters`, with `carry_over` done."""
        table = self._create(clusters)
        table.carry_over(self)
        return table

    def endpoint(self, cluster: str, address: str) -> Endpoint | None:
        """Return the tracked endpoint of `cluster` at `address`, if any."""
        state = self._states.get(cluster, {}).get(address)
        return None if state is None else state.endpoint

    def expire_ejections(self) -> list[Transition]:
        """End every ejection whose time is over; return the status changes."""
        now = self._clock()
        transitions = []
        for state in self._iter_states():
            transition = self._end_ejection(state, now)
            if transition is not None:
                transitions.append(transition)
        return transitions

    def pop_transitions(self) -> list[Transition]:
        """Return and clear the transitions queued by passive outcomes."""
        transitions = list(self._pending)
        self._pending.clear()
        return transitions

    def snapshot(self) -> dict[str, dict[str, dict[str, object]]]:
        """Return the state of every endpoint, per cluster, as plain values.

        Times (`since`, `ejected_until`) are readings of the table's clock;
        `ejected_until` is None when no ejection is running.
        """
        now = self._clock()
        result: dict[str, dict[str, dict[str, object]]] = {}
        for name, states in self._states.items():
            base = self._clusters[name].settings.outlier_detection.base_ejection_time
            result[name] = {
                address: self._describe(state, now, base)
                for address, state in states.items()
            }
        return result

    def carry_over(self, old: HealthTable) -> None:
        """Keep the state of endpoints whose (cluster, address) both tables have.

        Used on reload, so an endpoint that was down stays down in the new
        graph until its checks pass.
        """
        for name, states in self._states.items():
            old_states = old._states.get(name, {})
            for address, state in states.items():
                previous = old_states.get(address)
                if previous is not None:
                    state.copy_from(previous)

    def _create(self, clusters: Mapping[str, Cluster]) -> HealthTable:
        """Return an empty table of this kind, on the same clock."""
        return HealthTable(clusters, self._clock)

    def _state(self, endpoint: Endpoint) -> EndpointHealth | None:
        states = self._states.get(endpoint.cluster)
        return None if states is None else states.get(endpoint.address)

    def _iter_states(self) -> list[EndpointHealth]:
        return [state for states in self._states.values() for state in states.values()]

    def _may_eject(
        self, cluster: str, now: float, outlier: OutlierDetectionSettings
    ) -> bool:
        states = self._states[cluster]
        ejected = sum(1 for state in states.values() if state.ejected_until > now)
        return ejected < max_ejected(len(states), outlier.max_ejection_percent)

    def _eject(
        self,
        state: EndpointHealth,
        now: float,
        outlier: OutlierDetectionSettings,
        reason: str,
    ) -> None:
        count = state.consecutive_failures
        state.ejections = state.decayed_ejections(now, outlier.base_ejection_time) + 1
        duration = ejection_time(state.ejections, outlier)
        state.ejected_until = now + duration
        state.consecutive_failures = 0
        self.ejections_total += 1
        detail = f"{count} failures in a row, last: {reason}; ejected for {duration:g}s"
        self._queue(self._settle(state, now, detail))

    def _queue(self, transition: Transition | None) -> None:
        if transition is None:
            return
        if len(self._pending) >= MAX_PENDING_TRANSITIONS:
            self.dropped_transitions += 1
            return
        self._pending.append(transition)

    def _end_ejection(self, state: EndpointHealth, now: float) -> Transition | None:
        """Clear an ejection whose time is over; return the status change."""
        if not state.ejected_until or now < state.ejected_until:
            return None
        state.ejection_ended_at = state.ejected_until
        state.ejected_until = 0.0
        return self._settle(state, now, "ejection time is over")

    def _settle(
        self, state: EndpointHealth, now: float, reason: str
    ) -> Transition | None:
        """Compare the status with the last reported one; record a change."""
        new = state.current_status(now)
        if new is state.status:
            return None
        old = state.status
        state.status, state.reason, state.since = new, reason, now
        return Transition(state.endpoint, old, new, reason)

    @staticmethod
    def _describe(
        state: EndpointHealth, now: float, base_ejection_time: float
    ) -> dict[str, object]:
        ejected = bool(state.ejected_until) and now < state.ejected_until
        return {
            "status": state.current_status(now).value,
            "reason": state.reason,
            "since": state.since,
            "consecutive_probe_successes": state.consecutive_probe_successes,
            "consecutive_probe_failures": state.consecutive_probe_failures,
            "consecutive_failures": state.consecutive_failures,
            "ejected_until": state.ejected_until if ejected else None,
            "ejections": state.decayed_ejections(now, base_ejection_time),
        }
