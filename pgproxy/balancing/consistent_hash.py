"""Ketama consistent hashing, compatible with nginx's `hash $key consistent`.

The ring is built as ngx_http_upstream_hash_module builds it (nginx 1.22):

- Each endpoint's name is its address as an nginx `server` directive writes
  it (`10.0.0.1:8000`, `[::1]:8000`, `api.internal:80`), so a pgproxy
  `https://` endpoint is hashed without its scheme. The name is split at the
  last `:` that is followed only by digits into host and port.
- The endpoint gets `160 * weight` points. Point j is the CRC32 of
  `host \\0 port` followed by the 4 little-endian bytes of point j-1 (zero for
  the first point), which is the Cache::Memcached::Fast layout.
- Points are sorted by hash and, where several share a hash, only the first
  is kept. nginx sorts with an unstable qsort, so which endpoint keeps a
  colliding point may differ; with 32-bit hashes a collision is rare.
- A key's hash is the CRC32 of the key's bytes; its point is the first one
  whose hash is >= the key's hash, wrapping to the first point past the end.

Invariant: the candidates of a key are the distinct endpoints met walking the
ring clockwise from the key's point. When the caller skips an unhealthy
endpoint, the key moves to the next endpoint on the ring and every key whose
first endpoint is healthy stays where it was. A request without a key falls
back to smooth weighted round robin over the cluster.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Final

from pgproxy.balancing.base import Balancer
from pgproxy.balancing.round_robin import RoundRobinBalancer
from pgproxy.graph.types import Endpoint

POINTS_PER_WEIGHT = 160
# A ring of more points than 2**MAX_BUCKET_BITS gets that many buckets, so
# each bucket then contains more than one point on average.
MAX_BUCKET_BITS = 16
# A Final static: compiled code looks a module attribute up on each call.
_crc32: Final = zlib.crc32


def nginx_server_name(address: str) -> str:
    """Return the `server` directive text nginx would hash for an endpoint."""
    _, sep, rest = address.partition("://")
    name = rest if sep else address
    return name.rstrip("/")


def split_server_name(name: str) -> tuple[bytes, bytes]:
    """Split a server name into host and port the way nginx's ring builder does.

    The port is what follows the last `:` when only digits follow it; without
    such a suffix the whole name is the host and the port is empty.
    """
    data = name.encode()
    if data[:5].lower() == b"unix:":
        return data[5:], b""
    head, sep, tail = data.rpartition(b":")
    if sep and tail.isdigit():
        return head, tail
    if sep and not tail:
        return head, b""
    return data, b""


def ring_points(name: str, weight: int) -> list[int]:
    """Return the `160 * weight` ring hashes of one endpoint, in build order."""
    host, port = split_server_name(name)
    base = zlib.crc32(host + b"\0" + port)
    points = []
    previous = 0
    for _ in range(POINTS_PER_WEIGHT * weight):
        previous = zlib.crc32(previous.to_bytes(4, "little"), base)
        points.append(previous)
    return points


def key_hash(key: str) -> int:
    """Return the ring position of a key: CRC32 of its UTF-8 bytes.

    A key from a path that decoded to bytes that are not UTF-8 carries them
    as surrogates (`pgproxy.graph.paths`), which become those bytes again.
    """
    # Compiled code encodes to strict UTF-8 with a direct C call, while an
    # errors argument goes through the codec lookup. Only a surrogate raises.
    try:
        data = key.encode()
    except UnicodeEncodeError:
        data = key.encode("utf-8", "surrogateescape")
    return _crc32(data)


def bucket_starts(hashes: Sequence[int]) -> tuple[int, list[int]]:
    """Index sorted 32-bit `hashes` by their top bits, for `point_at`.

    Returns `shift` and `starts`: `starts[b]` is the index of the first hash
    whose value `>> shift` is `b` or more, and `starts[b + 1]` ends that
    bucket. There are between one and two buckets per hash, up to
    2**MAX_BUCKET_BITS buckets.
    """
    bits = min(len(hashes).bit_length(), MAX_BUCKET_BITS)
    shift = 32 - bits
    starts = []
    index = 0
    for bucket in range((1 << bits) + 1):
        while index < len(hashes) and hashes[index] >> shift < bucket:
            index += 1
        starts.append(index)
    return shift, starts


class ConsistentHashBalancer(Balancer):
    """A ketama ring over one cluster's endpoints."""

    __slots__ = (
        "_bucket_starts",
        "_endpoints",
        "_fallback",
        "_hashes",
        "_owners",
        "_shift",
    )

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        if not endpoints:
            raise ValueError("a balancer needs at least one endpoint")
        self._endpoints = tuple(endpoints)
        points: list[tuple[int, int]] = []
        for index, endpoint in enumerate(self._endpoints):
            name = nginx_server_name(endpoint.address)
            points.extend((h, index) for h in ring_points(name, endpoint.weight))
        # A stable sort keeps the earliest endpoint's point on a hash collision.
        points.sort(key=lambda point: point[0])
        hashes: list[int] = []
        owners: list[int] = []
        for point_hash, index in points:
            if hashes and hashes[-1] == point_hash:
                continue
            hashes.append(point_hash)
            owners.append(index)
        self._hashes = hashes
        self._owners = owners
        self._shift, self._bucket_starts = bucket_starts(hashes)
        self._fallback = RoundRobinBalancer(self._endpoints)

    def __repr__(self) -> str:
        return (
            f"<ConsistentHashBalancer endpoints={len(self._endpoints)} "
            f"points={len(self._hashes)}>"
        )

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoints on the ring, in configured order."""
        return self._endpoints

    def point_for(self, key: str) -> int:
        """Return the index of the first ring point at or after the key's hash."""
        return self.point_at(key_hash(key))

    def point_at(self, position: int) -> int:
        """Return the index of the first ring point whose hash is >= `position`.

        `position` is an unsigned 32-bit value, as `key_hash` returns. Past
        the last point the ring wraps to point 0.
        """
        # bisect.bisect_left over the position's bucket only. Compiled, it
        # compares tagged integers instead of calling PyObject_RichCompare, and
        # a ring of up to 2**MAX_BUCKET_BITS points has at most one point per
        # bucket on average.
        hashes = self._hashes
        bucket = position >> self._shift
        low = self._bucket_starts[bucket]
        high = self._bucket_starts[bucket + 1]
        while low < high:
            middle = (low + high) // 2
            if hashes[middle] < position:
                low = middle + 1
            else:
                high = middle
        return low if low < len(hashes) else 0

    def pick(self, key: str) -> Endpoint:
        """Return the endpoint that owns a key when every endpoint is healthy."""
        return self._endpoints[self._owners[self.point_for(key)]]

    def candidates(self, key: str | None) -> Iterator[Endpoint]:
        """Yield the key's endpoint, then the next distinct ones on the ring.

        Without a key the candidates come from smooth weighted round robin.
        """
        if key is None:
            return self._fallback.candidates(None)
        return self._walk(self.point_for(key))

    def _walk(self, start: int) -> Iterator[Endpoint]:
        endpoints = self._endpoints
        owners = self._owners
        first = owners[start]
        yield endpoints[first]
        if len(endpoints) == 1:
            return
        seen = {first}
        count = len(owners)
        for offset in range(1, count):
            index = owners[(start + offset) % count]
            if index not in seen:
                seen.add(index)
                yield endpoints[index]
                if len(seen) == len(endpoints):
                    return
