"""The delivery retry policy: outcomes, delays with jitter, Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.webhooks.retry import (
    MAX_RETRY_AFTER,
    MIN_RETRY_AFTER,
    Outcome,
    classify,
    next_delay,
    parse_retry_after,
    settle,
)

SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def no_jitter() -> float:
    return 0.5


def test_schedule_without_jitter() -> None:
    """With rand at 0.5 each retry waits exactly its schedule entry."""
    delays = [next_delay(n, SCHEDULE, None, no_jitter) for n in range(1, len(SCHEDULE) + 1)]
    assert delays == list(SCHEDULE)


def test_jitter_extremes() -> None:
    """rand 0 gives 80% of the schedule entry and rand near 1 almost 120%."""
    assert next_delay(2, SCHEDULE, None, lambda: 0.0) == pytest.approx(240.0)
    assert next_delay(2, SCHEDULE, None, lambda: 0.999999) == pytest.approx(360.0, rel=1e-5)


@given(
    attempt=st.integers(min_value=1, max_value=len(SCHEDULE)),
    r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_jitter_stays_within_twenty_percent(attempt: int, r: float) -> None:
    """Every jittered delay lies within 0.8 to 1.2 times its schedule entry."""
    delay = next_delay(attempt, SCHEDULE, None, lambda: r)
    entry = SCHEDULE[attempt - 1]
    assert delay is not None
    assert 0.8 * entry <= delay <= 1.2 * entry


@given(schedule=st.lists(st.floats(min_value=0, max_value=1e6), max_size=10))
def test_exhausted_schedule_gives_up(schedule: list[float]) -> None:
    """After as many failed attempts as the schedule has entries, there is no next delay."""
    assert next_delay(len(schedule) + 1, schedule, None, no_jitter) is None
    assert next_delay(len(schedule) + 5, schedule, 10.0, no_jitter) is None


def test_empty_schedule_never_retries() -> None:
    """An empty schedule gives up after the first attempt."""
    assert next_delay(1, (), None, no_jitter) is None


def test_attempt_below_one_is_an_error() -> None:
    """An attempt number below 1 is a programming error."""
    with pytest.raises(ValueError, match=">= 1"):
        next_delay(0, SCHEDULE, None, no_jitter)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        (120.0, 120.0),
        (0.0, MIN_RETRY_AFTER),
        (-30.0, MIN_RETRY_AFTER),
        (0.5, MIN_RETRY_AFTER),
        (86400.0, MAX_RETRY_AFTER),
        (float("inf"), MAX_RETRY_AFTER),
    ],
)
def test_retry_after_is_honoured_within_bounds(retry_after: float, expected: float) -> None:
    """A Retry-After replaces the schedule delay, clamped to its bounds and without jitter."""
    assert next_delay(1, SCHEDULE, retry_after, lambda: 0.0) == expected


def test_nan_retry_after_is_ignored() -> None:
    """A NaN Retry-After falls back to the schedule."""
    assert next_delay(2, SCHEDULE, float("nan"), no_jitter) == 300.0


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (None, Outcome.RETRY),
        (200, Outcome.DELIVERED),
        (201, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (299, Outcome.DELIVERED),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (599, Outcome.RETRY),
        (410, Outcome.DISABLE),
        (400, Outcome.FAILED),
        (401, Outcome.FAILED),
        (403, Outcome.FAILED),
        (404, Outcome.FAILED),
        (413, Outcome.FAILED),
        (100, Outcome.FAILED),
        (301, Outcome.FAILED),
        (302, Outcome.FAILED),
        (600, Outcome.FAILED),
    ],
)
def test_classify(status: int | None, outcome: Outcome) -> None:
    """2xx delivers; errors, timeouts, 408, 429 and 5xx retry; 410 disables; the rest fail."""
    assert classify(status) is outcome


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("  0 ", 0.0),
        ("1.5", 1.5),
        ("Thu, 02 Jan 2025 03:06:05 GMT", 120.0),
        ("Thu, 02 Jan 2025 03:04:05 GMT", 0.0),
        ("Wed, 01 Jan 2025 00:00:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str, expected: float) -> None:
    """Delta-seconds and HTTP-dates become seconds from now, never negative."""
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_date_against_naive_now() -> None:
    """A naive clock is taken as UTC."""
    naive = NOW.replace(tzinfo=None) - timedelta(seconds=60)
    assert parse_retry_after("Thu, 02 Jan 2025 03:04:05 GMT", naive) == 60.0


@pytest.mark.parametrize(
    "value", [None, "", "soon", "-5", "1e3", "nan", "inf", "²", "Thu, 99 Foo 2025", "9" * 400]
)
def test_parse_retry_after_garbage(value: str | None) -> None:
    """An absent or unparseable Retry-After is None."""
    assert parse_retry_after(value, NOW) is None


@given(st.text())
def test_parse_retry_after_never_raises(value: str) -> None:
    """Any header text parses to None or a non-negative number of seconds."""
    seconds = parse_retry_after(value, NOW)
    assert seconds is None or seconds >= 0


TWO_STEPS = (5.0, 300.0)
DAY = 86400.0


@pytest.mark.parametrize(
    ("status", "attempts", "outcome", "next_at"),
    [
        (200, 1, Outcome.DELIVERED, None),
        (204, 3, Outcome.DELIVERED, None),
        (500, 1, Outcome.RETRY, 1005.0),
        (None, 2, Outcome.RETRY, 1300.0),
        (503, 3, Outcome.FAILED, None),  # the schedule is exhausted
        (400, 1, Outcome.FAILED, None),
        (301, 1, Outcome.FAILED, None),  # redirects are not followed
        (410, 1, Outcome.DISABLE, None),
    ],
)
def test_settle_follows_the_schedule(
    status: int | None, attempts: int, outcome: Outcome, next_at: float | None
) -> None:
    """An attempt's status and count decide delivered, retry (when), failed or disable."""
    verdict = settle(status, attempts, 1000.0, TWO_STEPS, None, lambda: 0.5, None, 5 * DAY)
    assert verdict.outcome is outcome
    assert verdict.next_attempt_at == next_at
    assert (verdict.disable_reason is not None) == (outcome is Outcome.DISABLE)


def test_settle_disables_after_five_days_of_failure_only() -> None:
    """Failing for five days disables; a success, or a shorter run of failures, does not."""
    now = 10 * DAY
    args = (now, TWO_STEPS, None, lambda: 0.5)
    long_ago, recently = now - 5 * DAY, now - 4 * DAY
    assert settle(500, 1, *args, long_ago, 5 * DAY).disable_reason == (
        "every attempt failed for 5.0 days"
    )
    assert settle(500, 1, *args, recently, 5 * DAY).disable_reason is None
    assert settle(200, 1, *args, long_ago, 5 * DAY).disable_reason is None


def test_settle_honours_retry_after_and_refusals() -> None:
    """Retry-After replaces the jittered delay; an SSRF refusal fails without retry."""
    assert settle(429, 1, 0.0, TWO_STEPS, 30.0, lambda: 0.9, None, DAY).next_attempt_at == 30.0
    refused = settle(None, 1, 0.0, TWO_STEPS, None, lambda: 0.5, None, DAY, refused=True)
    assert refused.outcome is Outcome.FAILED
    assert refused.next_attempt_at is None
