"""`pgproxy run --watch`: reload when the config file changes.

The watcher polls the config file's identity: the path that its symlinks
resolve to, and the inode, size and mtime of the file itself. Polling needs
no extra dependency and sees changes that inotify-based watchers miss: a
Kubernetes ConfigMap update swaps a `..data` symlink in the folder, which
changes the resolved path and the inode, and network file systems send no
events at all. Other files in the folder are not looked at, so a log file
written next to the config neither triggers a reload nor delays one.

A change triggers one reload once the identity has stayed the same for
`debounce` seconds, so an editor's write-rename-chmod sequence gives one
reload and not a burst. A settled change whose bytes hash the same as the
last reload attempt's is skipped: touching the file, or rewriting an
invalid config unchanged, neither reloads nor logs the same error again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between two fingerprints
DEBOUNCE = 0.5  # seconds the file must stay unchanged before a reload

Stat = tuple[int, int, int] | None  # inode, size, mtime in ns; None if missing
Fingerprint = tuple[str, Stat]  # resolved path, stat of the file


def _stat(path: Path) -> Stat:
    try:
        result = path.stat()
    except OSError:
        return None
    return (result.st_ino, result.st_size, result.st_mtime_ns)


def fingerprint(path: Path) -> Fingerprint:
    """Return the identity of the config file, its symlinks resolved."""
    return (os.path.realpath(path), _stat(path))


def content_hash(path: Path) -> str | None:
    """Return the SHA-256 of the file's bytes, or None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def watch_config(
    path: str | Path,
    on_change: Callable[[], Awaitable[object]],
    *,
    interval: float = POLL_INTERVAL,
    debounce: float = DEBOUNCE,
) -> None:
    """Call `on_change` after each settled change of the file's bytes.

    Runs until cancelled. A failing `on_change` is its own business: the
    reload logs its outcome, and watching goes on.
    """
    config = _absolute(path)
    logger.info("watching %s for changes", config)
    last = fingerprint(config)
    attempted = content_hash(config)
    while True:
        await anyio.sleep(interval)
        current = fingerprint(config)
        if current == last:
            continue
        last = await _settle(config, current, debounce)
        digest = content_hash(config)
        if digest == attempted:
            logger.debug("%s changed but its bytes did not; no reload", config)
            continue
        attempted = digest
        logger.info("%s changed", config)
        await on_change()


def _absolute(path: str | Path) -> Path:
    return Path(path).absolute()


async def _settle(config: Path, current: Fingerprint, debounce: float) -> Fingerprint:
    """Wait until the fingerprint stays the same for `debounce` seconds."""
    while True:
        await anyio.sleep(debounce)
        latest = fingerprint(config)
        if latest == current:
            return latest
        current = latest
