"""Least request by the power of two random choices.

Each pick samples two distinct endpoints at random, with probability
proportional to weight, and takes the one with fewer in-flight requests per
unit of weight (the first sample on a tie). Two samples avoid the herd that
"always the global minimum" causes when many pickers share stale counts,
while still steering away from a loaded endpoint (Mitzenmacher, "The Power of
Two Choices in Randomized Load Balancing", 2001).

Invariant: `in_flight[i]` equals the number of `on_request_start` calls for
endpoint i minus the matching `on_request_end` calls, and never drops below 0.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator, Sequence

from pgproxy.balancing.base import Balancer
from pgproxy.graph.types import Endpoint


class LeastRequestBalancer(Balancer):
    """Power of two random choices on in-flight request counts."""

    __slots__ = ("_cumulative", "_endpoints", "_in_flight", "_index", "_rng", "_total")

    def __init__(
        self, endpoints: Sequence[Endpoint], rng: random.Random | None = None
    ) -> None:
        if not endpoints:
            raise ValueError("a balancer needs at least one endpoint")
        self._endpoints = tuple(endpoints)
        self._index = {endpoint: i for i, endpoint in enumerate(self._endpoints)}
        self._in_flight = [0] * len(self._endpoints)
        self._cumulative = list(itertools.accumulate(e.weight for e in endpoints))
        self._total = self._cumulative[-1]
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return (
            f"<LeastRequestBalancer endpoints={len(self._endpoints)} "
            f"in_flight={sum(self._in_flight)}>"
        )

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this balancer picks from, in configured order."""
        return self._endpoints

    def in_flight(self, endpoint: Endpoint) -> int:
        """Return the number of requests in flight on an endpoint."""
        return self._in_flight[self._index[endpoint]]

    def candidates(self, key: str | None = None) -> Iterator[Endpoint]:
        """Yield the better of two random endpoints, then the rest by load.

        Among the rest, endpoints with equal load come in weighted random order.

        `key` is ignored; it exists so every balancer has the same signature.
        """
        count = len(self._endpoints)
        if count == 1:
            return iter(self._endpoints)
        first = self._sample()
        second = self._sample_other(first)
        if self._load(second) < self._load(first):
            first = second
        return self._yield_from(first)

    def _yield_from(self, first: int) -> Iterator[Endpoint]:
        yield self._endpoints[first]
        # Later candidates are needed only when the caller skips the pick
        # (unhealthy or already tried). Sorting equal loads by u ** (1 / weight)
        # for a uniform u, larger first, orders them as weighted draws without
        # replacement. A skipped endpoint's share then spreads over the others
        # by weight, instead of all going to the first one in list order.
        rng = self._rng
        keys: dict[int, tuple[float, float]] = {}
        for i, endpoint in enumerate(self._endpoints):
            if i != first:
                keys[i] = (self._load(i), -(rng.random() ** (1.0 / endpoint.weight)))
        for i in sorted(keys, key=keys.__getitem__):
            yield self._endpoints[i]

    def _sample(self) -> int:
        point = self._rng.random() * self._total
        return bisect.bisect_right(self._cumulative, point)

    def _sample_other(self, excluded: int) -> int:
        # Draw from the weight line with the excluded endpoint's span cut
        # out, so one heavy endpoint cannot make the draw loop.
        weight = self._endpoints[excluded].weight
        point = self._rng.random() * (self._total - weight)
        if point >= self._cumulative[excluded] - weight:
            point += weight
        return bisect.bisect_right(self._cumulative, point)

    def _load(self, index: int) -> float:
        return self._in_flight[index] / self._endpoints[index].weight

    def on_request_start(self, endpoint: Endpoint) -> None:
        """Count one more request in flight on an endpoint."""
        self._in_flight[self._index[endpoint]] += 1

    def on_request_end(self, endpoint: Endpoint) -> None:
        """Count one request on an endpoint as finished."""
        index = self._index[endpoint]
        if self._in_flight[index] > 0:
            self._in_flight[index] -= 1
