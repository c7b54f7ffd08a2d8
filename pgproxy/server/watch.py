"""`pgproxy run --watch`: reload when the config file or its folder changes.

The watcher polls `stat()` of the config file (following symlinks) and of
the visible entries of its folder, and compares inode, size and mtime.
Polling needs no extra dependency and sees changes that inotify-based
watchers miss: a Kubernetes ConfigMap update swaps a symlink in the folder,
and network file systems send no events at all. A folder of a few dozen files
costs a few dozen `stat()` calls per interval.

A change triggers one reload once the fingerprint has stayed the same for
`debounce` seconds, so an editor's write-rename-chmod sequence, or a deploy
tool copying several files, gives one reload and not a burst.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0  # seconds between two fingerprints
DEBOUNCE = 0.5  # seconds the folder must stay unchanged before a reload
MAX_FOLDER_ENTRIES = 1000  # entries of the folder looked at, in name order

Stat = tuple[int, int, int] | None  # inode, size, mtime in ns; None if missing
Fingerprint = tuple[Stat, tuple[tuple[str, Stat], ...]]


def _stat(path: Path) -> Stat:
    try:
        result = path.stat()
    except OSError:
        return None
    return (result.st_ino, result.st_size, result.st_mtime_ns)


def _ignored(name: str) -> bool:
    """Whether a folder entry is an editor's or a tool's scratch file."""
    return (
        name.startswith(".")
        or name.endswith(("~", ".swp", ".swx", ".tmp"))
        or name.startswith("#")
    )


def fingerprint(path: Path) -> Fingerprint:
    """Return the state of the config file and of its folder's visible entries."""
    folder = path.parent
    try:
        names = sorted(name for name in os.listdir(folder) if not _ignored(name))
    except OSError:
        names = []
    entries = tuple((name, _stat(folder / name)) for name in names[:MAX_FOLDER_ENTRIES])
    return (_stat(path), entries)


async def watch_config(
    path: str | Path,
    on_change: Callable[[], Awaitable[object]],
    *,
    interval: float = POLL_INTERVAL,
    debounce: float = DEBOUNCE,
) -> None:
    """Call `on_change` after each settled change of the file or folder.

    Runs until cancelled. A failing `on_change` is its own business: the
    reload logs its outcome, and watching goes on.
    """
    config = _absolute(path)
    logger.info("watching %s and its folder for changes", config)
    last = fingerprint(config)
    while True:
        await anyio.sleep(interval)
        current = fingerprint(config)
        if current == last:
            continue
        last = await _settle(config, current, debounce)
        logger.info("%s or its folder changed", config)
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
