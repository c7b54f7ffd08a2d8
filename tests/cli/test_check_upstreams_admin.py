"""Tests of `check-upstreams --admin`: reading /status of a running instance."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import anyio.to_thread
import pytest

from pgproxy.cli.check_upstreams_admin import (
    EXIT_ALL_UP,
    EXIT_CLUSTER_DOWN,
    EXIT_NOT_CHECKED,
    EXIT_SOME_DOWN,
    AdminStatusError,
    check_admin,
    exit_code,
    fetch_status,
    format_age,
    select_clusters,
    status_url,
)
from pgproxy.server.admin import AdminServer, AdminSources

pytestmark = pytest.mark.anyio

DOCUMENT = {
    "config": {"file": "/etc/pgproxy.toml", "hash": "ab" * 32},
    "draining": False,
    "monotonic_now": 100.0,
    "workers": [],
    "clusters": {
        "api": {
            "10.0.0.1:80": {"status": "healthy", "reason": "", "since": 1.0},
            "10.0.0.2:80": {"status": "ejected", "reason": "5 failures", "since": 2.0},
        },
        "web": {"10.0.0.3:80": {"status": "healthy", "reason": "", "since": 1.0}},
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def document() -> dict[str, Any]:
    """The /status document that the `admin` fixture serves."""
    return DOCUMENT


@pytest.fixture
async def admin(document: dict[str, Any]) -> AsyncIterator[str]:
    async def status() -> Mapping[str, Any]:
        return document

    async def metrics() -> bytes:
        return b""

    server = AdminServer("127.0.0.1:0", AdminSources(metrics, status, lambda: False))
    address = server.bind()
    async with anyio.create_task_group() as group:
        group.start_soon(server.serve)
        yield address
        group.cancel_scope.cancel()


def test_status_url_forms() -> None:
    assert status_url("127.0.0.1:9901") == "http://127.0.0.1:9901/status"
    assert status_url("http://127.0.0.1:9901/") == "http://127.0.0.1:9901/status"
    with pytest.raises(AdminStatusError):
        status_url("https://127.0.0.1:9901")


def test_exit_codes() -> None:
    healthy = {"status": "healthy"}
    down = {"status": "unhealthy"}

    assert exit_code({"a": {"x": healthy}}) == EXIT_ALL_UP
    assert exit_code({"a": {"x": healthy, "y": down}}) == EXIT_SOME_DOWN
    assert exit_code({"a": {"x": healthy}, "b": {"y": down}}) == EXIT_CLUSTER_DOWN


def test_unknown_cluster_rejected() -> None:
    with pytest.raises(ValueError, match="unknown cluster nope"):
        select_clusters(DOCUMENT["clusters"], ["nope"])  # type: ignore[arg-type]


async def test_fetch_from_admin(admin: str) -> None:
    document = await anyio.to_thread.run_sync(fetch_status, admin, 5.0)

    assert document == DOCUMENT


async def test_report_json_with_ejection(
    admin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await anyio.to_thread.run_sync(check_admin, admin, ["api"], 5.0, "json")

    output = json.loads(capsys.readouterr().out)
    assert code == EXIT_SOME_DOWN
    assert output["exit_code"] == EXIT_SOME_DOWN
    assert [cluster["name"] for cluster in output["clusters"]] == ["api"]
    endpoints = {item["address"]: item for item in output["clusters"][0]["endpoints"]}
    assert endpoints["10.0.0.2:80"]["status"] == "ejected"
    assert endpoints["10.0.0.2:80"]["reason"] == "5 failures"
    assert endpoints["10.0.0.2:80"]["since"] == 2.0
    assert endpoints["10.0.0.2:80"]["status_age_s"] == 98.0
    assert endpoints["10.0.0.1:80"]["status_age_s"] == 99.0


async def test_text_report(admin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = await anyio.to_thread.run_sync(check_admin, admin, [], 5.0, "text")

    text = capsys.readouterr().out
    assert code == EXIT_SOME_DOWN
    assert "api: 1/2 healthy" in text
    assert "web: 1/1 healthy" in text
    assert "1m 39s ago" in text
    assert "1m 38s ago" in text


@pytest.mark.parametrize(
    "document",
    [{key: value for key, value in DOCUMENT.items() if key != "monotonic_now"}],
    ids=["without-monotonic-now"],
)
async def test_report_without_clock_reading(
    admin: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A /status document without `monotonic_now` gets no age, and no raw reading."""
    await anyio.to_thread.run_sync(check_admin, admin, ["api"], 5.0, "json")
    output = json.loads(capsys.readouterr().out)
    await anyio.to_thread.run_sync(check_admin, admin, ["api"], 5.0, "text")
    text = capsys.readouterr().out

    endpoints = output["clusters"][0]["endpoints"]
    assert [item["status_age_s"] for item in endpoints] == [None, None]
    assert [item["since"] for item in endpoints] == [1.0, 2.0]
    assert "ago" not in text
    assert "│ 1 " not in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s ago"),
        (59.9, "59s ago"),
        (60.0, "1m 0s ago"),
        (3599.0, "59m 59s ago"),
        (3600.0, "1h 0m ago"),
        (86399.0, "23h 59m ago"),
        (90061.0, "1d 1h ago"),
    ],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


def test_unreachable_admin(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening
    try:
        code = check_admin(address, [], 2.0, "json")
    finally:
        sock.close()

    output = json.loads(capsys.readouterr().out)
    assert code == EXIT_NOT_CHECKED
    assert "could not read" in output["error"]
