"""Tests of the supervisor's pure parts: worker count and worker settings."""

from __future__ import annotations

import os

import pytest

from pgproxy.server.slots import describe_exit
from pgproxy.server.worker import ENVIRONMENT_VARIABLE, WorkerSettings
from pgproxy.server.workers import worker_count


def test_worker_count_number() -> None:
    assert worker_count(3) == 3


def test_worker_count_auto_uses_cpus() -> None:
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1

    assert worker_count("auto") == expected


def test_settings_round_trip() -> None:
    settings = WorkerSettings("/etc/pgproxy.toml", 1, 7, {"main": 8, "tls": 9}, "DEBUG")

    decoded = WorkerSettings.from_environment(
        {ENVIRONMENT_VARIABLE: settings.to_environment()}
    )

    assert decoded == settings


def test_settings_missing_raise() -> None:
    with pytest.raises(KeyError):
        WorkerSettings.from_environment({})


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (0, "exit code 0"),
        (1, "exit code 1"),
        (-9, "signal SIGKILL"),
        (None, "an unknown status"),
    ],
)
def test_describe_exit(code: int | None, text: str) -> None:
    assert describe_exit(code) == text
