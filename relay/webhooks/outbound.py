"""The HTTP requests one delivery makes, in the subscription's format. Pure, no I/O.

A Standard Webhook and a Slack message are one request each; a PagerDuty delivery is
one request per action it decided (a turn that fails ends its stall and triggers the
session's failed-turn incident: two events). The delivery succeeds once every request
has been answered 2xx; a retry sends them all again (PagerDuty deduplicates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from relay import __version__
from relay.timefmt import format_unix
from relay.webhooks.formats import (
    Format,
    incident_effect,
    render_pagerduty,
    render_slack,
    replay_actions,
    test_event_pagerduty,
)
from relay.webhooks.model import ClaimedDelivery
from relay.webhooks.signing import webhook_request

OutboundRequest = tuple[bytes, dict[str, str]]


def outbound_requests(
    fmt: Format,
    delivery: ClaimedDelivery,
    secrets: Sequence[str],
    routing_key: str | None,
    extra_headers: Mapping[str, str],
    dashboard_url: str | None,
    now: float,
) -> list[OutboundRequest]:
    """Body and headers of each request, in order; `extra_headers` (the subscription's
    static headers, resolved) are added to each."""
    if fmt is Format.STANDARD:
        body, headers = webhook_request(
            delivery.message_id, delivery.type, delivery.body, secrets, now
        )
        return [(body, {**headers, **extra_headers})]
    plain = {
        "content-type": "application/json",
        "user-agent": f"relay/{__version__}",
        **extra_headers,
    }
    change = _change(delivery, now)
    if fmt is Format.SLACK:
        return [(render_slack(change, dashboard_url), dict(plain))]
    key = routing_key or ""
    if delivery.change_id is None:
        bodies = test_event_pagerduty(delivery.message_id, key, now)
    else:
        # Queued before the subscription became a PagerDuty one: decided from the change.
        actions = delivery.alert_actions or replay_actions(
            incident_effect(delivery.type, change.get("session_id") or "", change.get("turn_id"))
        )
        bodies = render_pagerduty(change, actions, key, dashboard_url)
    return [(body, dict(plain)) for body in bodies]


def _change(delivery: ClaimedDelivery, now: float) -> dict[str, Any]:
    if delivery.change_id is None:  # a test event
        return {
            "type": delivery.type,
            "occurred_at": format_unix(now),
            "session_id": None,
            "turn_id": None,
            "message": "a test event from relay",
        }
    change: dict[str, Any] = orjson.loads(delivery.body)
    return change
