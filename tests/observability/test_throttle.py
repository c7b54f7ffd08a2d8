"""The throttle on process log lines about failed requests."""

from __future__ import annotations

import logging

import pytest

from pgproxy.observability.throttle import LogThrottle, log_failure, message_kind


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_line_of_kind_logged() -> None:
    throttle = LogThrottle(interval=1.0, clock=FakeClock())
    assert throttle.admit(("failed", "a:1")) == 0
    assert throttle.admit(("failed", "b:1")) == 0


def test_repeats_within_interval_counted() -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=1.0, clock=clock)
    assert throttle.admit("kind") == 0
    for _ in range(5):
        clock.now += 0.1
        assert throttle.admit("kind") is None
    clock.now += 0.6
    assert throttle.admit("kind") == 5
    assert throttle.admit("kind") is None


def test_kinds_cleared_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pgproxy.observability.throttle.MAX_KINDS", 3)
    throttle = LogThrottle(interval=1.0, clock=FakeClock())
    for kind in ("a", "b", "c"):
        assert throttle.admit(kind) == 0
    assert throttle.admit("a") is None
    assert throttle.admit("d") == 0  # clears the table first
    assert throttle.admit("a") == 0


def test_log_failure_appends_count(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("pgproxy.test_throttle")
    kind = ("test_log_failure_appends_count", object())
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(3):
            log_failure(logger, logging.WARNING, kind, "endpoint %s failed", "a:1")
    assert [r.getMessage() for r in caplog.records] == ["endpoint a:1 failed"]


def test_log_failure_skips_disabled_level(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("pgproxy.test_throttle_disabled")
    kind = ("test_log_failure_skips_disabled_level", object())
    with caplog.at_level(logging.WARNING, logger=logger.name):
        log_failure(logger, logging.INFO, kind, "retrying")
        log_failure(logger, logging.WARNING, kind, "failed")
    # The INFO line was not enabled, so it used up no slot of its kind.
    assert [r.getMessage() for r in caplog.records] == ["failed"]


def test_message_kind_ignores_numbers() -> None:
    first = message_kind("invalid response: status code 600 is outside 100-599")
    second = message_kind("invalid response: status code 731 is outside 100-599")
    assert first == second
    assert message_kind("connect failed: connection refused") == (
        "connect failed: connection refused"
    )
