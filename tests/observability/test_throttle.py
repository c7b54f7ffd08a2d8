"""The throttle on process log lines about failed requests."""

from __future__ import annotations

import logging

import anyio
import pytest

from pgproxy.health.passive import run_transition_sweeper
from pgproxy.health.state import HealthTable
from pgproxy.observability import throttle as throttle_module
from pgproxy.observability.throttle import (
    FailureLine,
    LogThrottle,
    flush_failure_lines,
    log_failure,
    message_kind,
)

LOGGER = logging.getLogger("pgproxy.test_throttle")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def line(message: str = "endpoint %s failed", *args: object) -> FailureLine:
    return FailureLine(LOGGER, logging.WARNING, message, args or ("a:1",))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Give log_failure a throttle of its own on a fake clock."""
    fake = FakeClock()
    monkeypatch.setattr(throttle_module, "_THROTTLE", LogThrottle(1.0, fake))
    return fake


def test_first_line_of_kind_logged() -> None:
    throttle = LogThrottle(interval=1.0, clock=FakeClock())
    assert throttle.admit(("failed", "a:1"), line()) == 0
    assert throttle.admit(("failed", "b:1"), line()) == 0


def test_repeats_within_interval_counted() -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=1.0, clock=clock)
    assert throttle.admit("kind", line()) == 0
    for _ in range(5):
        clock.now += 0.1
        assert throttle.admit("kind", line()) is None
    clock.now += 0.6
    assert throttle.admit("kind", line()) == 5
    assert throttle.admit("kind", line()) is None


def test_kinds_cleared_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pgproxy.observability.throttle.MAX_KINDS", 3)
    throttle = LogThrottle(interval=1.0, clock=FakeClock())
    for kind in ("a", "b", "c"):
        assert throttle.admit(kind, line()) == 0
    assert throttle.admit("a", line()) is None
    assert throttle.admit("b", line()) is None
    assert throttle.admit("b", line()) is None
    assert throttle.admit("d", line()) == 0  # clears the table first
    assert throttle.admit("a", line()) == 0
    # The three lines left out of "a" and "b" are dropped, and counted.
    assert throttle.take_dropped() == (3, 2)
    assert throttle.take_dropped() == (0, 0)


def test_take_due_waits_for_interval() -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=1.0, clock=clock)
    throttle.admit("kind", line())
    clock.now += 0.5
    throttle.admit("kind", line())
    assert throttle.take_due() == []
    clock.now += 0.4
    assert throttle.take_due() == []


def test_take_due_returns_quiet_kind() -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=1.0, clock=clock)
    throttle.admit("kind", line("failed: %s", "first"))
    for text in ("second", "third"):
        clock.now += 0.2
        throttle.admit("kind", line("failed: %s", text))
    clock.now += 1.0
    assert throttle.take_due() == [(line("failed: %s", "third"), 2)]
    assert throttle.take_due() == []
    # The reported line counts as the kind's last line.
    clock.now += 0.5
    assert throttle.admit("kind", line()) is None


def test_take_due_forgets_quiet_kinds() -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=1.0, clock=clock)
    throttle.admit("a", line())
    throttle.admit("b", line())
    throttle.admit("b", line())
    clock.now += 1.0
    assert len(throttle.take_due()) == 1
    assert "kinds=1 " in repr(throttle)
    clock.now += 1.0
    assert throttle.take_due() == []
    assert "kinds=0 " in repr(throttle)


def test_take_due_every_kind() -> None:
    clock = FakeClock()
    throttle = LogThrottle(interval=1.0, clock=clock)
    throttle.admit("kind", line())
    clock.now += 0.1
    throttle.admit("kind", line())
    assert throttle.take_due() == []
    assert throttle.take_due(every_kind=True) == [(line(), 1)]


def test_log_failure_appends_count(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        for _ in range(3):
            log_failure(LOGGER, logging.WARNING, "kind", "endpoint %s failed", "a:1")
        clock.now += 1.0
        log_failure(LOGGER, logging.WARNING, "kind", "endpoint %s failed", "a:1")
    assert [r.getMessage() for r in caplog.records] == [
        "endpoint a:1 failed",
        "endpoint a:1 failed (2 more like this since the last such line)",
    ]


def test_log_failure_skips_disabled_level(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        log_failure(LOGGER, logging.INFO, "kind", "retrying")
        log_failure(LOGGER, logging.WARNING, "kind", "failed")
    # The INFO line was not enabled, so it used up no slot of its kind.
    assert [r.getMessage() for r in caplog.records] == ["failed"]


def test_flush_reports_kind_that_stopped(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        for status in (600, 601, 602):
            log_failure(LOGGER, logging.INFO, "kind", "status %d", status)
        assert flush_failure_lines() == 0
        clock.now += 1.0
        assert flush_failure_lines() == 1
        assert flush_failure_lines() == 0
    records = caplog.records
    assert [r.getMessage() for r in records] == [
        "status 600",
        "status 602 (1 more like this since the last such line)",
    ]
    assert records[1].levelno == logging.INFO


def test_flush_single_left_out_line_without_count(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        log_failure(LOGGER, logging.WARNING, "kind", "failed")
        log_failure(LOGGER, logging.WARNING, "kind", "failed")
        assert flush_failure_lines(every_kind=True) == 1
    assert [r.getMessage() for r in caplog.records] == ["failed", "failed"]


def test_log_failure_reports_dropped_counts(
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(throttle_module, "MAX_KINDS", 2)
    with caplog.at_level(logging.WARNING):
        for kind in ("a", "b", "a", "a", "b"):
            log_failure(LOGGER, logging.WARNING, kind, "failed %s", kind)
        log_failure(LOGGER, logging.WARNING, "c", "failed %s", "c")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == ["failed a", "failed b"]
    assert messages[2].startswith(
        "3 process log lines about failed requests, of 2 kinds, were left out"
    )
    assert messages[3] == "failed c"
    assert len(messages) == 4


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_sweeper_reports_left_out_lines(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        for _ in range(4):
            log_failure(LOGGER, logging.WARNING, "kind", "failed")
        clock.now += 1.0
        # The first round runs at once, and the period is long enough that
        # the scope ends before a second one.
        with anyio.move_on_after(0.2):
            await run_transition_sweeper(HealthTable({}, clock), period=60.0)
    assert [r.getMessage() for r in caplog.records] == [
        "failed",
        "failed (2 more like this since the last such line)",
    ]


def test_message_kind_ignores_numbers() -> None:
    first = message_kind("invalid response: status code 600 is outside 100-599")
    second = message_kind("invalid response: status code 731 is outside 100-599")
    assert first == second
    assert message_kind("connect failed: connection refused") == (
        "connect failed: connection refused"
    )
