"""Tests of the config file watcher on a real folder."""

from __future__ import annotations

import os
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


def test_fingerprint_sees_new_file_in_folder(tmp_path: Path) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text("a")
    before = fingerprint(config)

    (tmp_path / "cert.pem").write_text("x")

    assert fingerprint(config) != before


def test_fingerprint_ignores_scratch_files(tmp_path: Path) -> None:
    config = tmp_path / "pgproxy.toml"
    config.write_text("a")
    before = fingerprint(config)

    (tmp_path / ".pgproxy.toml.swp").write_text("x")
    (tmp_path / "pgproxy.toml~").write_text("x")

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
