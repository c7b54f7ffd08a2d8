"""Weighted random selection.

The first candidate is drawn with probability proportional to its weight;
every later candidate is drawn the same way from the endpoints not yet
yielded, so a retry still favours heavy endpoints. The random source is
injected, which makes the sequence reproducible under a seeded generator.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator, Sequence

from pgproxy.balancing.base import Balancer
from pgproxy.graph.types import Endpoint


class RandomBalancer(Balancer):
    """Weighted random choice over one cluster's endpoints."""

    __slots__ = ("_cumulative", "_endpoints", "_rng", "_total")

    def __init__(
        self, endpoints: Sequence[Endpoint], rng: random.Random | None = None
    ) -> None:
        if not endpoints:
            raise ValueError("a balancer needs at least one endpoint")
        self._endpoints = tuple(endpoints)
        self._cumulative = list(itertools.accumulate(e.weight for e in endpoints))
        self._total = self._cumulative[-1]
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return (
            f"<RandomBalancer endpoints={len(self._endpoints)} "
            f"total_weight={self._total}>"
        )

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints this balancer picks from, in configured order."""
        return self._endpoints

    def candidates(self, key: str | None = None) -> Iterator[Endpoint]:
        """Yield every endpoint once, in weighted random order.

        `key` is ignored; it exists so every balancer has the same signature.
        """
        point = self._rng.random() * self._total
        first = bisect.bisect_right(self._cumulative, point)
        return self._yield_from(first)

    def _yield_from(self, first: int) -> Iterator[Endpoint]:
        endpoints = self._endpoints
        yield endpoints[first]
        remaining = [i for i in range(len(endpoints)) if i != first]
        while remaining:
            total = sum(endpoints[i].weight for i in remaining)
            point = self._rng.random() * total
            chosen = len(remaining) - 1
            for position, index in enumerate(remaining):
                point -= endpoints[index].weight
                if point < 0:
                    chosen = position
                    break
            yield endpoints[remaining.pop(chosen)]
