"""Least request: power of two choices steers away from loaded endpoints."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pgproxy.balancing.least_request import LeastRequestBalancer
from pgproxy.graph.types import Endpoint
from tests.balancing.endpoints import endpoints


def test_prefers_less_loaded_of_two() -> None:
    balancer = LeastRequestBalancer(endpoints(1, 1), random.Random(1))
    busy, idle = balancer.endpoints
    for _ in range(5):
        balancer.on_request_start(busy)
    picks = Counter(next(balancer.candidates(None)) for _ in range(200))
    assert picks == {idle: 200}


def test_loaded_endpoint_gets_less_traffic() -> None:
    balancer = LeastRequestBalancer(endpoints(1, 1, 1, 1), random.Random(7))
    loaded = balancer.endpoints[0]
    for _ in range(10):
        balancer.on_request_start(loaded)
    picks = Counter(next(balancer.candidates(None)) for _ in range(4000))
    # The loaded endpoint wins only when both samples are itself, which two
    # distinct samples never are.
    assert picks[loaded] == 0
    for other in balancer.endpoints[1:]:
        assert 1000 < picks[other] < 1700


def test_balanced_load_spreads_evenly() -> None:
    balancer = LeastRequestBalancer(endpoints(1, 1, 1), random.Random(3))
    picks: Counter[str] = Counter()
    for _ in range(3000):
        chosen = next(balancer.candidates(None))
        balancer.on_request_start(chosen)
        picks[chosen.host] += 1
    # Requests never finish, so the in-flight counts must stay level.
    counts = [balancer.in_flight(e) for e in balancer.endpoints]
    assert max(counts) - min(counts) <= 2
    assert sum(picks.values()) == 3000


def test_weight_scales_load() -> None:
    balancer = LeastRequestBalancer(endpoints(3, 1), random.Random(5))
    heavy, light = balancer.endpoints
    for _ in range(4):
        balancer.on_request_start(heavy)
    balancer.on_request_start(light)
    balancer.on_request_start(light)
    # 4/3 in flight per unit of weight beats 2/1.
    assert next(balancer.candidates(None)) == heavy


def test_request_end_never_negative() -> None:
    balancer = LeastRequestBalancer(endpoints(1, 1), random.Random(0))
    endpoint = balancer.endpoints[0]
    balancer.on_request_start(endpoint)
    balancer.on_request_end(endpoint)
    balancer.on_request_end(endpoint)
    assert balancer.in_flight(endpoint) == 0
    assert "in_flight=0" in repr(balancer)


def test_candidates_rest_by_load() -> None:
    balancer = LeastRequestBalancer(endpoints(1, 1, 1, 1), random.Random(2))
    loads = [3, 0, 2, 1]
    for endpoint, load in zip(balancer.endpoints, loads, strict=True):
        for _ in range(load):
            balancer.on_request_start(endpoint)
    order = list(balancer.candidates(None))
    assert len(order) == 4
    rest = [balancer.in_flight(e) for e in order[1:]]
    assert rest == sorted(rest)


def test_single_endpoint() -> None:
    balancer = LeastRequestBalancer(endpoints(2))
    assert list(balancer.candidates(None)) == list(balancer.endpoints)


def test_heavy_weight_does_not_stall_sampling() -> None:
    balancer = LeastRequestBalancer(endpoints(1000, 1), random.Random(9))
    picks = Counter(next(balancer.candidates(None)) for _ in range(100))
    assert sum(picks.values()) == 100


def test_empty_endpoint_list_rejected() -> None:
    with pytest.raises(ValueError, match="at least one endpoint"):
        LeastRequestBalancer([])


def _first_available(balancer: LeastRequestBalancer, skipped: Endpoint) -> Endpoint:
    """Return the first candidate other than `skipped`, as the proxy picks it."""
    return next(e for e in balancer.candidates(None) if e != skipped)


def test_skipped_endpoint_share_spreads_evenly() -> None:
    balancer = LeastRequestBalancer(endpoints(1, 1, 1), random.Random(11))
    down, first_listed, last_listed = balancer.endpoints
    picks = Counter(_first_available(balancer, down) for _ in range(3000))
    # Each gets half. Before the fix the first listed one also took every
    # pick of the skipped endpoint: about 2000 against 1000.
    assert 1300 < picks[first_listed] < 1700, picks
    assert 1300 < picks[last_listed] < 1700, picks


def test_skipped_endpoint_share_follows_weight() -> None:
    balancer = LeastRequestBalancer(endpoints(2, 1, 3), random.Random(12))
    down, light, heavy = balancer.endpoints
    picks = Counter(_first_available(balancer, down) for _ in range(4000))
    # With equal loads every pick is weighted 1:3 between the two, whether
    # it is a first pick or a fallback from the skipped endpoint.
    assert 800 < picks[light] < 1200, picks
    assert 2800 < picks[heavy] < 3200, picks
