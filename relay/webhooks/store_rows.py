"""Row encodings every delivery store backend shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from relay.changes import stored_body
from relay.webhooks.formats import actions_from_json
from relay.webhooks.model import AttemptResult, ClaimedDelivery, PreviousSecret

# The subscription columns `update_subscription` may set.
UPDATABLE = frozenset(
    {
        "url",
        "description",
        "types",
        "session_ids",
        "ordering",
        "max_in_flight",
        "enabled",
        "disabled_reason",
        "failing_since",
        "updated_at",
        "enabled_changed_at",
        "format",
        "routing_key",
        "headers",
    }
)


def previous_secrets_from_json(text: str) -> tuple[PreviousSecret, ...]:
    """Rotated-out secrets from their column: [{"secret": hex, "until": unix seconds}]."""
    return tuple(
        PreviousSecret(bytes.fromhex(entry["secret"]), float(entry["until"]))
        for entry in orjson.loads(text)
    )


def previous_secrets_json(previous: Sequence[PreviousSecret]) -> str:
    """The column text of rotated-out secrets."""
    return orjson.dumps([{"secret": p.secret.hex(), "until": p.until} for p in previous]).decode()


def headers_json(headers: Sequence[tuple[str, str]]) -> str:
    """The column text of a subscription's static headers: [[name, value], ...]."""
    return orjson.dumps([[name, value] for name, value in headers]).decode()


def claimed_delivery(subscription_id: str, row: Sequence[Any]) -> ClaimedDelivery:
    """A claimed delivery from its row: (id, change id, type, body, cycle attempts, alert
    actions, then the raw event's columns a raw change's body is rebuilt from)."""
    delivery_id, change_id, change_type, body, cycle, actions, *event = row
    if change_id is not None:
        body = stored_body(change_id, body, tuple(event))
    return ClaimedDelivery(
        delivery_id,
        subscription_id,
        change_id,
        change_type,
        body,
        cycle,
        actions_from_json(actions),
    )


def result_args(result: AttemptResult) -> tuple[Any, ...]:
    """What an attempt's result sets on its delivery: status, cycle attempts, next
    attempt, last status code and error, the time, and the delivery's id last."""
    a = result.attempt
    return (
        result.status.value,
        result.cycle_attempts,
        result.next_attempt_at,
        a.status_code,
        a.error,
        a.at,
        a.delivery_id,
    )


def attempt_args(result: AttemptResult) -> tuple[Any, ...]:
    """An attempt's row: delivery id, time, status code, latency, response, error."""
    a = result.attempt
    return (a.delivery_id, a.at, a.status_code, a.latency_ms, a.response, a.error)
