"""Ketama ring: layout, key movement on membership change, weights, walking."""

from __future__ import annotations

import bisect
import zlib
from collections import Counter

import pytest

from pgproxy.balancing.consistent_hash import (
    MAX_BUCKET_BITS,
    ConsistentHashBalancer,
    bucket_starts,
    key_hash,
    nginx_server_name,
    ring_points,
    split_server_name,
)
from pgproxy.graph.paths import normalize_path
from tests.balancing.endpoints import endpoints

KEYS = [f"key-{i}" for i in range(10_000)]


def test_point_layout() -> None:
    points = ring_points("127.0.0.1:8080", 2)
    assert len(points) == 320
    first = zlib.crc32(b"127.0.0.1\x008080" + b"\x00\x00\x00\x00")
    assert points[0] == first
    assert points[1] == zlib.crc32(b"127.0.0.1\x008080" + first.to_bytes(4, "little"))


@pytest.mark.parametrize(
    ("name", "host", "port"),
    [
        ("10.0.0.1:80", b"10.0.0.1", b"80"),
        ("[::1]:8080", b"[::1]", b"8080"),
        ("backend.internal:8000", b"backend.internal", b"8000"),
        ("backend", b"backend", b""),
        ("[::1]", b"[::1]", b""),
        ("unix:/run/app.sock", b"/run/app.sock", b""),
    ],
)
def test_split_server_name(name: str, host: bytes, port: bytes) -> None:
    assert split_server_name(name) == (host, port)


def test_server_name_drops_scheme() -> None:
    assert nginx_server_name("https://api.internal:8443") == "api.internal:8443"
    assert nginx_server_name("http://10.0.0.1:80/") == "10.0.0.1:80"
    assert nginx_server_name("[::1]:80") == "[::1]:80"


def test_key_hash_is_crc32() -> None:
    assert key_hash("user-1") == zlib.crc32(b"user-1")


def test_key_hash_non_utf8_path() -> None:
    # `/%FF` decodes to a surrogate; its hash is that of the byte sent.
    path = normalize_path("/%FF")
    assert key_hash(path) == zlib.crc32(b"/\xff")


def test_key_hash_non_ascii_is_utf8() -> None:
    assert key_hash("é") == zlib.crc32(b"\xc3\xa9")


def sorted_ring(ring: ConsistentHashBalancer) -> list[int]:
    """Return the ring's point hashes, built again from its endpoints."""
    hashes: set[int] = set()
    for endpoint in ring.endpoints:
        name = nginx_server_name(endpoint.address)
        hashes.update(ring_points(name, endpoint.weight))
    return sorted(hashes)


@pytest.mark.parametrize("weights", [(1,), (1, 1, 1), (1, 3, 2, 5, 1), (60,) * 8])
def test_point_at_matches_bisect(weights: tuple[int, ...]) -> None:
    ring = ConsistentHashBalancer(endpoints(*weights))
    hashes = sorted_ring(ring)
    # Every point, its neighbours, both ends of the hash space and a spread.
    positions = {0, 2**32 - 1, *range(0, 2**32, 7_919_111)}
    for point_hash in hashes:
        positions.update((point_hash - 1, point_hash, point_hash + 1))
    for position in sorted(p for p in positions if 0 <= p < 2**32):
        expected = bisect.bisect_left(hashes, position) % len(hashes)
        assert ring.point_at(position) == expected, position


def test_point_for_is_point_at_key_hash() -> None:
    ring = ConsistentHashBalancer(endpoints(1, 2, 3))
    for key in KEYS[:500]:
        assert ring.point_for(key) == ring.point_at(key_hash(key))


def test_bucket_starts_bounds_each_bucket() -> None:
    hashes = [0, 5, 2**31, 2**31 + 1, 2**32 - 1]
    shift, starts = bucket_starts(hashes)
    # 5 hashes take 3 bits: 8 buckets of 2**29 values each.
    assert shift == 29
    assert starts == [0, 2, 2, 2, 2, 4, 4, 4, 5]


def test_bucket_starts_capped() -> None:
    hashes = list(range(0, 2**32, 2**32 // (2**MAX_BUCKET_BITS * 2)))
    shift, starts = bucket_starts(hashes)
    assert shift == 32 - MAX_BUCKET_BITS
    assert len(starts) == 2**MAX_BUCKET_BITS + 1
    assert starts[1] == 2


def test_same_key_same_endpoint_across_instances() -> None:
    first = ConsistentHashBalancer(endpoints(1, 1, 1, 1))
    second = ConsistentHashBalancer(list(reversed(endpoints(1, 1, 1, 1))))
    assert all(first.pick(k) == second.pick(k) for k in KEYS[:2000])


def test_removing_one_of_ten_moves_only_its_keys() -> None:
    full = endpoints(*[1] * 10)
    before = ConsistentHashBalancer(full)
    removed = full[3]
    after = ConsistentHashBalancer([e for e in full if e != removed])
    moved = [k for k in KEYS if before.pick(k) != after.pick(k)]
    # Keys of other endpoints never move; the removed endpoint's share is
    # about 1/10, and 160 points per endpoint keep it within 1/10 +- 5 points.
    assert all(before.pick(k) == removed for k in moved)
    assert len(moved) <= 1500
    assert len(moved) >= 500


def test_adding_an_endpoint_moves_keys_only_to_it() -> None:
    full = endpoints(*[1] * 10)
    before = ConsistentHashBalancer(full[:9])
    after = ConsistentHashBalancer(full)
    moved = [k for k in KEYS if before.pick(k) != after.pick(k)]
    assert all(after.pick(k) == full[9] for k in moved)
    assert len(moved) <= 1500


def test_weights_scale_shares() -> None:
    ring = ConsistentHashBalancer(endpoints(1, 2, 3))
    counts = Counter(ring.pick(k).host for k in KEYS)
    shares = [counts[f"10.0.0.{i}"] / len(KEYS) for i in (1, 2, 3)]
    # Expected 1/6, 2/6, 3/6; ketama with 160 points per weight unit stays
    # within 6 points of that on 10,000 keys.
    for share, expected in zip(shares, (1 / 6, 2 / 6, 3 / 6), strict=True):
        assert abs(share - expected) < 0.06


def test_unhealthy_walk_keeps_other_keys() -> None:
    ring = ConsistentHashBalancer(endpoints(*[1] * 5))
    down = ring.endpoints[2]
    moved_to: Counter[str] = Counter()
    for key in KEYS:
        owner = ring.pick(key)
        chosen = next(e for e in ring.candidates(key) if e != down)
        if owner != down:
            assert chosen == owner
        else:
            moved_to[chosen.host] += 1
    # The dead endpoint's keys spread over the others instead of one heir.
    assert len(moved_to) == 4
    assert max(moved_to.values()) < 0.6 * sum(moved_to.values())


def test_candidates_cover_cluster_once() -> None:
    ring = ConsistentHashBalancer(endpoints(1, 3, 1, 2))
    for key in KEYS[:200]:
        order = list(ring.candidates(key))
        assert order[0] == ring.pick(key)
        assert len(order) == 4
        assert set(order) == set(ring.endpoints)


def test_missing_key_falls_back_to_round_robin() -> None:
    ring = ConsistentHashBalancer(endpoints(2, 1))
    firsts = [next(ring.candidates(None)).host for _ in range(6)]
    assert firsts == ["10.0.0.1", "10.0.0.2", "10.0.0.1"] * 2


def test_single_endpoint_ring() -> None:
    ring = ConsistentHashBalancer(endpoints(1))
    assert list(ring.candidates("k")) == list(ring.endpoints)
    assert "points=160" in repr(ring)
