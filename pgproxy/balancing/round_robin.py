"""Smooth weighted round robin, the algorithm of nginx's upstream round robin.

On every pick each endpoint's current weight grows by its weight, the
endpoint with the largest current weight wins (the first one in list order on
a tie) and the winner's current weight drops by the total weight. Weights
5:1:1 give `a a b a c a a`, and 2:1 gives `A B A`, not `A A B`, so a heavy
endpoint never receives a burst.

The sequence repeats every `total weight` picks, because after that many
steps every endpoint has won exactly `weight` times and all current weights
are back at zero. The balancer therefore precomputes one period and the
first pick of a request costs one list index. Later candidates of the same
request (retries, or picks the caller skipped as unhealthy) run a live smooth
step over the endpoints not yet yielded, as nginx does with its `tried`
bitmap, so the load of a skipped endpoint spreads by weight over the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from pgproxy.balancing.base import Balancer
from pgproxy.graph.types import Endpoint

# A period longer than this is not precomputed: every pick then runs the live
# smooth step, which costs O(endpoints) instead of O(1).
MAX_SCHEDULE_LENGTH = 16_384


def smooth_schedule(weights: Sequence[int]) -> list[int]:
    """Return one period of nginx's smooth weighted round robin as indexes."""
    current = [0] * len(weights)
    total = sum(weights)
    schedule = []
    for _ in range(total):
        best = _smooth_step(current, weights, total, range(len(weights)))
        schedule.append(best)
    return schedule


def _smooth_step(
    current: list[int], weights: Sequence[int], total: int, indexes: Iterable[int]
) -> int:
    """Run one smooth weighted step over `indexes`; mutate `current`."""
    best = -1
    for i in indexes:
        current[i] += weights[i]
        if best < 0 or current[i] > current[best]:
            best = i
    current[best] -= total
    return best


class RoundRobinBalancer(Balancer):
    """Smooth weighted round robin over one cluster's endpoints."""

    __slots__ = ("_endpoints", "_fallback", "_position", "_schedule", "_weights")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        if not endpoints:
            raise ValueError("a balancer needs at least one endpoint")
        self._endpoints = tuple(endpoints)
        self._weights = tuple(endpoint.weight for endpoint in endpoints)
        total = sum(self._weights)
        self._schedule: tuple[int, ...] | None = None
        if total <= MAX_SCHEDULE_LENGTH:
            self._schedule = tuple(smooth_schedule(self._weights))
        self._position = 0
        # Current weights of the live step: used for the first pick when the
        # period is too long to precompute, and for every later candidate.
        self._fallback = [0] * len(self._endpoints)

    def __repr__(self) -> str:
        return (
            f"<RoundRobinBalancer endpoints={len(self._endpoints)} "
            f"total_weight={sum(self._weights)} position={self._position}>"
        )

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this balancer picks from, in configured order."""
        return self._endpoints

    def next_endpoint(self) -> Endpoint:
        """Advance the rotation by one pick and return the endpoint picked."""
        return self._endpoints[self._next_index()]

    def _next_index(self) -> int:
        schedule = self._schedule
        if schedule is not None:
            position = self._position
            self._position = position + 1 if position + 1 < len(schedule) else 0
            return schedule[position]
        weights = self._weights
        return _smooth_step(self._fallback, weights, sum(weights), range(len(weights)))

    def candidates(self, key: str | None = None) -> Iterator[Endpoint]:
        """Yield every endpoint once: the next in rotation, then by weight.

        `key` is ignored; it exists so every balancer has the same signature.
        """
        first = self._next_index()
        yield self._endpoints[first]
        if len(self._endpoints) > 1:
            yield from self._rest(first)

    def _rest(self, first: int) -> Iterator[Endpoint]:
        remaining = [i for i in range(len(self._endpoints)) if i != first]
        weights = self._weights
        while remaining:
            total = sum(weights[i] for i in remaining)
            index = _smooth_step(self._fallback, weights, total, remaining)
            remaining.remove(index)
            yield self._endpoints[index]
