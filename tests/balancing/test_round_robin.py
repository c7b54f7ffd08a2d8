"""Smooth weighted round robin against nginx's published sequences."""

from __future__ import annotations

from collections import Counter

import pytest

from pgproxy.balancing import round_robin
from pgproxy.balancing.round_robin import RoundRobinBalancer, smooth_schedule
from tests.balancing.endpoints import endpoints


def _firsts(balancer: RoundRobinBalancer, count: int) -> str:
    names = "abcdefghij"
    picks = [next(balancer.candidates(None)) for _ in range(count)]
    return " ".join(names[int(p.host.rsplit(".", 1)[1]) - 1] for p in picks)


def test_nginx_sequence_5_1_1() -> None:
    balancer = RoundRobinBalancer(endpoints(5, 1, 1))
    assert _firsts(balancer, 14) == "a a b a c a a a a b a c a a"


def test_nginx_sequence_2_1() -> None:
    balancer = RoundRobinBalancer(endpoints(2, 1))
    assert _firsts(balancer, 6) == "a b a a b a"


def test_equal_weights_rotate() -> None:
    balancer = RoundRobinBalancer(endpoints(1, 1, 1))
    assert _firsts(balancer, 6) == "a b c a b c"


def test_live_step_matches_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduled = RoundRobinBalancer(endpoints(5, 1, 1, 3))
    monkeypatch.setattr(round_robin, "MAX_SCHEDULE_LENGTH", 0)
    live = RoundRobinBalancer(endpoints(5, 1, 1, 3))
    assert "position" in repr(live)
    assert _firsts(live, 40) == _firsts(scheduled, 40)


def test_schedule_shares_match_weights() -> None:
    counts = Counter(smooth_schedule([7, 3, 1, 1]))
    assert counts == {0: 7, 1: 3, 2: 1, 3: 1}


def test_candidates_yield_every_endpoint_once() -> None:
    balancer = RoundRobinBalancer(endpoints(3, 1, 2, 1))
    for _ in range(10):
        order = list(balancer.candidates(None))
        assert sorted(e.address for e in order) == sorted(
            e.address for e in balancer.endpoints
        )


def test_skipped_pick_spreads_by_weight() -> None:
    # The caller skips endpoint a (unhealthy); its share must go to b and c by
    # their weights, not all to the endpoint after a.
    balancer = RoundRobinBalancer(endpoints(1, 1, 1))
    served: Counter[str] = Counter()
    for _ in range(300):
        chosen = next(e for e in balancer.candidates(None) if e.host != "10.0.0.1")
        served[chosen.host] += 1
    assert served == {"10.0.0.2": 150, "10.0.0.3": 150}


def test_single_endpoint() -> None:
    balancer = RoundRobinBalancer(endpoints(4))
    assert [e.host for e in balancer.candidates(None)] == ["10.0.0.1"]


def test_empty_endpoint_list_rejected() -> None:
    with pytest.raises(ValueError, match="at least one endpoint"):
        RoundRobinBalancer([])
