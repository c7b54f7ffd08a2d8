"""Logging of health changes, and the sweep that ends ejections on time.

The data plane records real traffic outcomes in the pure `HealthTable`, which
only queues the resulting transitions, so the request path never logs. The
sweeper pops them and logs each once: WARNING when an endpoint stops serving,
INFO when it serves again, DEBUG when it moves between two down states (from
ejected to unhealthy, for example). A worker process whose supervisor
decides its health passes `log_applied_transition` instead, because the
supervisor logs each change once for all workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

from pgproxy.health.state import HealthTable, Transition
from pgproxy.observability.throttle import flush_failure_lines

logger = logging.getLogger(__name__)

# How often finished ejections are ended and queued transitions logged. An
# ejected endpoint takes traffic again as soon as its time is over, whatever
# this period, because `is_available` reads the clock itself.
SWEEP_PERIOD_S = 0.5


def log_transition(transition: Transition) -> None:
    """Log one health change at the level its direction calls for."""
    endpoint = transition.endpoint
    if transition.came_back:
        logger.info(
            "endpoint %s of cluster %s is healthy again (%s)",
            endpoint,
            endpoint.cluster,
            transition.reason,
        )
    elif transition.went_down:
        logger.warning(
            "endpoint %s of cluster %s is %s: %s",
            endpoint,
            endpoint.cluster,
            transition.new.value,
            transition.reason,
        )
    else:
        logger.debug(
            "endpoint %s of cluster %s went from %s to %s: %s",
            endpoint,
            endpoint.cluster,
            transition.old.value,
            transition.new.value,
            transition.reason,
        )


def log_applied_transition(transition: Transition) -> None:
    """Log at DEBUG a change that another process decided and logged."""
    endpoint = transition.endpoint
    logger.debug(
        "endpoint %s of cluster %s went from %s to %s as the supervisor decided: %s",
        endpoint,
        endpoint.cluster,
        transition.old.value,
        transition.new.value,
        transition.reason,
    )


def flush_transitions(
    table: HealthTable, log: Callable[[Transition], None] = log_transition
) -> int:
    """End finished ejections and log every pending transition; return the count."""
    transitions = table.pop_transitions() + table.expire_ejections()
    for transition in transitions:
        log(transition)
    dropped = table.dropped_transitions
    if dropped:
        table.dropped_transitions = 0
        logger.warning("%d health changes were not logged (queue full)", dropped)
    return len(transitions)


async def run_transition_sweeper(
    table: HealthTable,
    period: float = SWEEP_PERIOD_S,
    log: Callable[[Transition], None] = log_transition,
) -> None:
    """Call `flush_transitions` every `period` seconds until cancelled.

    Each round also logs the counts of failure lines that the throttle left
    out (`flush_failure_lines`), because every serving process runs this
    sweeper.
    """
    while True:
        flush_transitions(table, log)
        flush_failure_lines()
        await anyio.sleep(period)
