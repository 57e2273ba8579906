"""What the webhook layers pass around: subscriptions, deliveries, attempts and their filter."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from relay.changes import glob_pattern
from relay.webhooks.formats import AlertAction, Format
from relay.webhooks.signing import message_id

TEST_EVENT_TYPE = "webhook.test"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERING = "delivering"
    RETRYING = "retrying"
    DELIVERED = "delivered"
    FAILED = "failed"


class Ordering(StrEnum):
    NONE = "none"
    SESSION = "session"


@dataclass(frozen=True, slots=True)
class PreviousSecret:
    """A rotated-out secret (encrypted) that keeps signing until `until`."""

    secret: bytes
    until: float


@dataclass(frozen=True, slots=True)
class Subscription:
    id: str
    url: str
    description: str
    types: tuple[str, ...]
    session_ids: tuple[str, ...]
    ordering: Ordering
    max_in_flight: int
    enabled: bool
    disabled_reason: str | None
    secret: bytes  # encrypted
    previous_secrets: tuple[PreviousSecret, ...]  # rotated out, still signing until each ends
    failing_since: float | None
    start_after: int
    created_at: str
    updated_at: str
    enabled_changed_at: float | None = None  # when the API last set `enabled`
    format: Format = Format.STANDARD
    routing_key: bytes | None = None  # encrypted; PagerDuty only
    headers: tuple[tuple[str, str], ...] = ()  # static; a value may be `env:VAR`


@dataclass(frozen=True, slots=True)
class Delivery:
    id: int
    subscription_id: str
    change_id: int | None
    type: str
    session_id: str | None
    status: DeliveryStatus
    attempts: int
    cycle_attempts: int
    next_attempt_at: float | None
    last_status: int | None
    last_error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Attempt:
    delivery_id: int
    at: float
    status_code: int | None
    latency_ms: float
    response: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """A delivery taken for one attempt, with the body it sends."""

    id: int
    subscription_id: str
    change_id: int | None
    type: str
    body: bytes
    cycle_attempts: int
    alert_actions: tuple[AlertAction, ...] = ()  # PagerDuty: what this change sends

    @property
    def message_id(self) -> str:
        """`webhook-id`: the same for every attempt of one change."""
        return delivery_message_id(self.id, self.change_id)


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt did, and the delivery's status and next due time after it."""

    attempt: Attempt
    subscription_id: str
    status: DeliveryStatus
    cycle_attempts: int
    next_attempt_at: float | None
    disable_reason: str | None = None  # set when the subscription must be disabled now
    frees_slot_on_record: bool = False  # its in-flight slot is freed once it is written


def delivery_message_id(delivery_id: int, change_id: int | None) -> str:
    """`msg_<change id>` for a change; a test event has an id of its own."""
    return f"msg_test_{delivery_id}" if change_id is None else message_id(change_id)


class ChangeFilter:
    """Which changes a subscription receives: types and session ids, names or globs.

    Without types, every change but raw events (`raw.*`) matches; raw events match
    only types that are listed.
    """

    __slots__ = ("_sessions", "_types")

    def __init__(self, types: tuple[str, ...], session_ids: tuple[str, ...]) -> None:
        self._types = glob_pattern(types)  # no types: every change but raw events
        self._sessions: re.Pattern[str] | None = glob_pattern(session_ids) if session_ids else None

    def __call__(self, change_type: str, session_id: str | None) -> bool:
        if self._types.fullmatch(change_type) is None:
            return False
        if self._sessions is None:
            return True
        return session_id is not None and self._sessions.fullmatch(session_id) is not None
