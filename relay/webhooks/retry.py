"""Retry policy for outbound deliveries: what a response means and when to try again.

Everything here is pure. `classify` maps a response status (None for a network error or
a timeout) to an `Outcome`; `next_delay` gives the wait before the next attempt from the
configured schedule with ±20% jitter, or the receiver's `Retry-After` (bounded), and
None once the schedule is exhausted; `parse_retry_after` reads the header; `settle`
combines them into what becomes of a delivery (and its subscription) after an attempt.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

JITTER = 0.2
MIN_RETRY_AFTER = 1.0
MAX_RETRY_AFTER = 3600.0
RETRY_STATUSES = frozenset({408, 429})

_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)


class Outcome(StrEnum):
    """What one delivery attempt means for the delivery and its subscription."""

    DELIVERED = "delivered"
    RETRY = "retry"
    FAILED = "failed"
    DISABLE = "disable"


def classify(status: int | None) -> Outcome:
    """The outcome of an attempt that got `status`, or None for a network error or timeout."""
    if status is None or status in RETRY_STATUSES or 500 <= status <= 599:
        return Outcome.RETRY
    if 200 <= status <= 299:
        return Outcome.DELIVERED
    if status == 410:
        return Outcome.DISABLE
    return Outcome.FAILED


def next_delay(
    attempt: int,
    schedule: Sequence[float],
    retry_after: float | None,
    rand: Callable[[], float],
) -> float | None:
    """Seconds to wait after `attempt` failed attempts, or None to give up.

    `rand` returns a number in [0, 1) that picks the jitter factor in [0.8, 1.2].
    A `Retry-After` from the receiver replaces the jittered delay, bounded to
    [MIN_RETRY_AFTER, MAX_RETRY_AFTER]; it never extends the schedule.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts the attempts already made, so is >= 1, not {attempt}")
    if attempt > len(schedule):
        return None
    if retry_after is not None and not math.isnan(retry_after):
        return min(max(retry_after, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
    factor = 1.0 + JITTER * (2.0 * rand() - 1.0)
    factor = min(max(factor, 1.0 - JITTER), 1.0 + JITTER)
    return schedule[attempt - 1] * factor


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds (>= 0) asked for by a `Retry-After` header, or None if absent or unparseable.

    Accepts delta-seconds ("120") and an HTTP-date ("Wed, 21 Oct 2015 07:28:00 GMT");
    a date in the past means 0.
    """
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return max((when - now).total_seconds(), 0.0)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What becomes of a delivery after an attempt."""

    outcome: Outcome
    next_attempt_at: float | None  # None: the delivery is finished (delivered or failed)
    disable_reason: str | None = None  # set when the subscription is to be disabled


def settle(
    status: int | None,
    attempts: int,
    now: float,
    schedule: Sequence[float],
    retry_after: float | None,
    rand: Callable[[], float],
    failing_since: float | None,
    disable_after: float,
    refused: bool = False,
) -> Verdict:
    """The verdict on an attempt that got `status` (None: no response), the `attempts`-th
    of its retry cycle, made at `now`.

    `failing_since` is when the subscription's current run of failures began (None if
    its last attempt succeeded); a run longer than `disable_after` seconds disables it.
    A destination the SSRF guard `refused` fails at once: retrying would not change it.
    """
    outcome = Outcome.FAILED if refused else classify(status)
    if outcome is Outcome.DELIVERED:
        return Verdict(outcome, None)
    if outcome is Outcome.DISABLE:
        return Verdict(outcome, None, "the endpoint answered 410 Gone")
    disable = None
    if failing_since is not None and now - failing_since >= disable_after:
        days = (now - failing_since) / 86400
        disable = f"every attempt failed for {days:.1f} days"
    if outcome is Outcome.FAILED:
        return Verdict(outcome, None, disable)
    delay = next_delay(attempts, schedule, retry_after, rand)
    if delay is None:
        return Verdict(Outcome.FAILED, None, disable)
    return Verdict(outcome, now + delay, disable)
