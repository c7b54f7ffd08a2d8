"""The base class of every balancer.

A class, not a Protocol: the proxy calls `candidates`, `on_request_start`
and `on_request_end` once per request, and compiled code calls a method of a
compiled class through its vtable but a Protocol's method by name, with a
type lookup per call. It lives apart from pgproxy/balancing/__init__.py
because compiled classes must derive from compiled classes.
"""

from __future__ import annotations

from collections.abc import Iterator

from pgproxy.graph.types import Endpoint


class Balancer:
    """Orders a cluster's endpoints for one request."""

    def candidates(self, key: str | None) -> Iterator[Endpoint]:
        """Yield every endpoint of the cluster at most once, best first.

        `key` is the request's hash key (see `hash_key_value`); only
        consistent_hash uses it, and None makes it fall back to round robin.
        """
        raise NotImplementedError

    def on_request_start(self, endpoint: Endpoint) -> None:
        """Record that a request was sent to `endpoint`; only some balancers do."""

    def on_request_end(self, endpoint: Endpoint) -> None:
        """Record that a request to `endpoint` finished, in any way."""
