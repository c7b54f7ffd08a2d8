"""Tests of the config file watcher on a real folder."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from pgproxy.server.watch import fingerprint, watch_config

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_fingerprint_sees_content_change(tmp_path: Path) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text("a")
    before = fingerprint(config)

    config.write_text("ab")

    assert fingerprint(config) != before


def test_fingerprint_ignores_other_files(tmp_path: Path) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text("a")
    before = fingerprint(config)

    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "pgproxy.log").write_text("access line\n")

    assert fingerprint(config) == before


def test_fingerprint_follows_symlink_swap(tmp_path: Path) -> None:
    # The layout of a Kubernetes ConfigMap volume.
    for version in ("v1", "v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "pgproxy.toml").write_text(version)
    (tmp_path / "..data").symlink_to("v1")
    config = tmp_path / "pgproxy.toml"
    config.symlink_to("..data/pgproxy.toml")
    before = fingerprint(config)

    (tmp_path / "..data_new").symlink_to("v2")
    os.replace(tmp_path / "..data_new", tmp_path / "..data")

    assert fingerprint(config) != before


async def test_burst_of_writes_gives_one_call(tmp_path: Path) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text("a")
    calls: list[float] = []
    changed = anyio.Event()

    async def on_change() -> None:
        calls.append(anyio.current_time())
        changed.set()

    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: watch_config(config, on_change, interval=0.05, debounce=1.0)
        )
        await anyio.sleep(0.2)
        for size in range(2, 7):
            config.write_text("a" * size)
            await anyio.sleep(0.05)
        with anyio.fail_after(10):
            await changed.wait()
        await anyio.sleep(1.5)  # a second call would come within one debounce
        group.cancel_scope.cancel()

    assert len(calls) == 1


async def test_no_change_no_call(tmp_path: Path) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text("a")
    calls: list[int] = []

    async def on_change() -> None:
        calls.append(1)

    with anyio.move_on_after(0.5):
        await watch_config(config, on_change, interval=0.05, debounce=0.05)

    assert calls == []


async def _count_calls(
    config: Path, change: Callable[[], Awaitable[None]], wait: float
) -> int:
    """Run the watcher while `change` runs, then `wait` more seconds; count calls."""
    calls: list[int] = []

    async def on_change() -> None:
        calls.append(1)

    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: watch_config(config, on_change, interval=0.05, debounce=0.2)
        )
        await anyio.sleep(0.1)
        await change()
        await anyio.sleep(wait)
        group.cancel_scope.cancel()
    return len(calls)


async def test_busy_folder_does_not_delay_reload(tmp_path: Path) -> None:
    # The log file changes every 0.05 s, four times per debounce interval.
    config = tmp_path / "pgproxy.toml"
    config.write_text("a")
    log = tmp_path / "pgproxy.log"

    async def change() -> None:
        config.write_text("ab")
        for index in range(40):
            log.write_text(f"line {index}\n")
            await anyio.sleep(0.05)

    assert await _count_calls(config, change, wait=0.1) == 1


async def test_unchanged_bytes_no_call(tmp_path: Path) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text("a")

    async def change() -> None:
        # Same bytes in a new file renamed over the config: a new inode.
        replacement = tmp_path / "pgproxy.toml.new"
        replacement.write_text("a")
        os.replace(replacement, config)

    assert await _count_calls(config, change, wait=1.0) == 0


async def test_same_bytes_again_no_second_call(tmp_path: Path) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text("a")

    async def change() -> None:
        config.write_text("ab")
        await anyio.sleep(1.0)
        os.utime(config, ns=(1, 1))  # new mtime, same bytes: no second call
        await anyio.sleep(1.0)
        config.write_text("abc")

    assert await _count_calls(config, change, wait=1.0) == 2
