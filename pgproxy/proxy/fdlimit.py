"""The open file limit, and the client connections a process can hold within it.

Every client connection takes a file descriptor, and so does the upstream
connection it uses. When a process runs out, libuv accepts each waiting
connection and closes it at once to keep its listening socket usable
(`uv__emfile_trick`), so clients see resets and nothing is logged. pgproxy
therefore raises its soft limit to the hard one at startup, and closes new
client connections itself, with a warning, before the descriptors run out.
"""

from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

# Descriptors set aside for what is not a client connection or the upstream
# connection it uses: listening sockets, the admin listener, health probes,
# log files and worker pipes.
# NOTE: idle pooled connections come on top, up to max_idle_connections per
# endpoint. A process with many endpoints can still run out, and its upstream
# connects then fail with 502 (connect_failure).
RESERVED_DESCRIPTORS = 32
# The lowest cap, so that a tiny limit still serves a few clients.
MIN_CONNECTIONS = 16


def open_file_limit() -> int | None:
    """Return the soft limit on open files of this process, or None if unlimited."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return int(soft)


def raise_open_file_limit() -> int | None:
    """Raise the soft limit on open files to the hard limit; return the new soft limit.

    Many systems start processes with a soft limit of 1,024 and a much
    higher hard limit. A process may raise its own soft limit up to the
    hard one without privileges; Go programs do so at startup since Go 1.19.
    """
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            # macOS rejects a soft limit above OPEN_MAX, such as an unlimited one.
            logger.debug("open file limit stays at %d: %s", soft, exc)
        else:
            logger.debug("open file limit raised from %d to %d", soft, hard)
    return open_file_limit()


def connection_cap(limit: int | None) -> int | None:
    """Return how many client connections a process with `limit` files may keep open.

    Half of the descriptors left after `RESERVED_DESCRIPTORS`, because each
    client connection may hold an upstream connection too; None for no limit.
    """
    if limit is None:
        return None
    return max(MIN_CONNECTIONS, (limit - RESERVED_DESCRIPTORS) // 2)
