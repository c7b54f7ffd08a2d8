"""Weighted random: shares follow weights under a seeded generator."""

from __future__ import annotations

import random
from collections import Counter

from pgproxy.balancing.random import RandomBalancer
from tests.balancing.endpoints import endpoints


def test_shares_follow_weights() -> None:
    balancer = RandomBalancer(endpoints(1, 2, 7), random.Random(11))
    picks = Counter(next(balancer.candidates(None)).host for _ in range(20_000))
    # Binomial standard deviation at 20,000 draws is under 0.4 points;
    # 2 points of tolerance is five deviations.
    for host, expected in (("10.0.0.1", 0.1), ("10.0.0.2", 0.2), ("10.0.0.3", 0.7)):
        assert abs(picks[host] / 20_000 - expected) < 0.02


def test_candidates_yield_every_endpoint_once() -> None:
    balancer = RandomBalancer(endpoints(1, 5, 2, 1), random.Random(4))
    for _ in range(200):
        order = list(balancer.candidates(None))
        assert len(order) == 4
        assert set(order) == set(balancer.endpoints)


def test_second_candidate_follows_weights() -> None:
    balancer = RandomBalancer(endpoints(1, 1, 8), random.Random(8))
    seconds: Counter[str] = Counter()
    for _ in range(5000):
        order = list(balancer.candidates(None))
        if order[0].host == "10.0.0.1":
            seconds[order[1].host] += 1
    share = seconds["10.0.0.3"] / sum(seconds.values())
    assert abs(share - 8 / 9) < 0.05


def test_seeded_generators_agree() -> None:
    first = RandomBalancer(endpoints(1, 2, 3), random.Random(42))
    second = RandomBalancer(endpoints(1, 2, 3), random.Random(42))
    assert [list(first.candidates(None)) for _ in range(50)] == [
        list(second.candidates(None)) for _ in range(50)
    ]
    assert "endpoints=3" in repr(first)
