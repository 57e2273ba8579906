"""Alert formats: what a change looks like to Slack and to PagerDuty. Pure, no I/O.

Theory of operation. A `standard` subscription receives every change it filters for as a
signed Standard Webhook. An alerting tool wants incidents instead: PagerDuty opens one
on a `trigger` and closes it on a `resolve` of the same `dedup_key`. Three problems open
incidents, each with a key of its own:

- `turn.stalled` opens `…/turn/<turn>/stalled`; the turn's end (`turn.completed` or
  `turn.failed` of that turn) resolves it;
- `session.ready_timeout` opens `…/ready_timeout`; `session.ready` resolves it;
- `turn.failed` opens (or adds to) `…/turn_failed`, one per session; a later
  `turn.completed` of the session resolves it.

`incident_effect` says, from a change's type, session and turn alone, which key it
triggers and which it may resolve. Whether it does resolve depends on what was opened
before for that subscription: the enqueuer keeps the open keys per subscription (in
change-id order, so the bookkeeping is exact) and stores on the delivery the actions it
decided (`AlertAction`s). A change with no action gets no delivery: it is not sent. The
renderers then turn a change and its actions into request bodies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import orjson

from relay.timefmt import format_unix

MAX_DEDUP_KEY = 255
_SEVERITY = {
    "turn.stalled": "warning",
    "session.ready_timeout": "error",
    "turn.failed": "error",
}


class Format(StrEnum):
    STANDARD = "standard"
    SLACK = "slack"
    PAGERDUTY = "pagerduty"


class Action(StrEnum):
    TRIGGER = "trigger"
    RESOLVE = "resolve"


@dataclass(frozen=True, slots=True)
class AlertAction:
    action: Action
    dedup_key: str


@dataclass(frozen=True, slots=True)
class IncidentEffect:
    """The key a change triggers (if any) and the keys it resolves if they are open."""

    triggers: str | None
    resolves: tuple[str, ...]


def dedup_key(session_id: str, *parts: str) -> str:
    """A stable key for one problem; a long one is shortened by hashing (PagerDuty takes
    at most 255 characters)."""
    key = "/".join(("relay", session_id, *parts))
    if len(key) <= MAX_DEDUP_KEY:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"relay/{digest}/{parts[-1] if parts else ''}"


def incident_effect(change_type: str, session_id: str, turn_id: str | None) -> IncidentEffect:
    ready = dedup_key(session_id, "ready_timeout")
    failed = dedup_key(session_id, "turn_failed")
    stalled = dedup_key(session_id, "turn", turn_id, "stalled") if turn_id else None
    if change_type == "session.ready_timeout":
        return IncidentEffect(ready, ())
    if change_type == "session.ready":
        return IncidentEffect(None, (ready,))
    if change_type == "turn.stalled":
        return IncidentEffect(stalled, ())
    if change_type == "turn.failed":
        return IncidentEffect(failed, (stalled,) if stalled else ())
    if change_type == "turn.completed":
        return IncidentEffect(None, (stalled, failed) if stalled else (failed,))
    return IncidentEffect(None, ())


def decide_actions(
    effect: IncidentEffect, open_keys: dict[str, int], change_id: int
) -> tuple[AlertAction, ...]:
    """What to send for change `change_id` given the keys open for the subscription (each
    with the change that triggered it), which it updates: resolves of open keys first,
    then the trigger."""
    actions = []
    for key in effect.resolves:
        if open_keys.pop(key, None) is not None:
            actions.append(AlertAction(Action.RESOLVE, key))
    if effect.triggers is not None:
        open_keys[effect.triggers] = change_id
        actions.append(AlertAction(Action.TRIGGER, effect.triggers))
    return tuple(actions)


def replay_actions(
    effect: IncidentEffect, open_keys: dict[str, int] | None = None
) -> tuple[AlertAction, ...]:
    """What to send again for a past change (`recover`) so that the receiver ends up as
    things are now: triggers of keys still open, resolves of keys no longer open. Without
    `open_keys` (unknown), every trigger and resolve of the change."""
    known = open_keys is not None
    opened = open_keys or {}
    actions = [AlertAction(Action.RESOLVE, key) for key in effect.resolves if key not in opened]
    if effect.triggers is not None and (effect.triggers in opened or not known):
        actions.append(AlertAction(Action.TRIGGER, effect.triggers))
    return tuple(actions)


def actions_json(actions: tuple[AlertAction, ...]) -> str:
    return orjson.dumps([[a.action.value, a.dedup_key] for a in actions]).decode()


def actions_from_json(text: str | None) -> tuple[AlertAction, ...]:
    if not text:
        return ()
    return tuple(AlertAction(Action(action), key) for action, key in orjson.loads(text))


# -- rendering ---------------------------------------------------------------------------------


def session_link(dashboard_url: str | None, session_id: str | None) -> str | None:
    """The session's page on the dashboard, if its address is configured."""
    if not dashboard_url or not session_id:
        return None
    return f"{dashboard_url.rstrip('/')}/#session={quote(session_id, safe='')}"


def _error_text(turn: dict[str, Any] | None) -> str | None:
    error = (turn or {}).get("error")
    if not error:
        return None
    code = error.get("code")
    return f"{error.get('message') or ''}" + (f" ({code})" if code else "")


def _turn_of(change: dict[str, Any]) -> dict[str, Any] | None:
    turn = change.get("turn")
    if isinstance(turn, dict):
        return turn
    session = change.get("session") or {}
    last = session.get("last_turn")
    return last if isinstance(last, dict) else None


def summary(change: dict[str, Any]) -> str:
    """One line saying what happened."""
    kind = change.get("type", "")
    if kind == "webhook.test":
        return "webhook.test: a test event from relay"
    session_id = change.get("session_id") or "?"
    turn_id = change.get("turn_id")
    subject = f"turn {turn_id} of session {session_id}" if turn_id else f"session {session_id}"
    error = _error_text(change.get("turn"))
    text = f"{kind}: {subject}"
    if error:
        text += f": {error}"
    return text


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_slack(change: dict[str, Any], dashboard_url: str | None) -> bytes:
    """A Slack incoming-webhook message: `text` (the fallback) and `blocks`."""
    session = change.get("session") or {}
    turn = _turn_of(change)
    kind = str(change.get("type") or "change")
    text = _truncate(_escape(summary(change)), 3000)
    fields = [
        ("Session", change.get("session_id") or "-"),
        ("Turn", change.get("turn_id") or "-"),
        ("Status", _status(change, session, turn)),
        ("Error", _error_text(change.get("turn")) or "-"),
    ]
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": _truncate(kind, 150)},
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": text},
            "fields": [
                {"type": "mrkdwn", "text": _truncate(f"*{name}*\n{_escape(str(value))}", 2000)}
                for name, value in fields
            ],
        },
    ]
    link = session_link(dashboard_url, change.get("session_id"))
    if link is not None:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open in the dashboard"},
                        "url": _truncate(link, 3000),
                    }
                ],
            }
        )
    if change.get("occurred_at"):
        blocks.append(
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"at {change['occurred_at']}"}],
            }
        )
    return orjson.dumps({"text": text, "blocks": blocks})


def _status(change: dict[str, Any], session: dict[str, Any], turn: dict[str, Any] | None) -> str:
    kind = str(change.get("type", ""))
    if kind.startswith("turn.") and change.get("turn"):
        return str(change["turn"].get("status", "-"))
    parts = [str(session.get("readiness", "-"))]
    if turn is not None:
        parts.append(f"last turn {turn.get('status', '-')}")
    return ", ".join(parts)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_pagerduty(
    change: dict[str, Any],
    actions: tuple[AlertAction, ...],
    routing_key: str,
    dashboard_url: str | None,
) -> list[bytes]:
    """One PagerDuty Events API v2 event per action, in order."""
    bodies = []
    session_id = change.get("session_id")
    link = session_link(dashboard_url, session_id)
    for action in actions:
        kind = str(change.get("type", ""))
        severity = _SEVERITY.get(kind, "info") if action.action is Action.TRIGGER else "info"
        event: dict[str, Any] = {
            "routing_key": routing_key,
            "event_action": action.action.value,
            "dedup_key": action.dedup_key,
            "payload": {
                "summary": _truncate(_pd_summary(change, action), 1024),
                "source": f"relay session {session_id}" if session_id else "relay",
                "severity": severity,
                "timestamp": change.get("occurred_at"),
                "component": "relay",
                "class": kind,
                "custom_details": {
                    "change_id": change.get("id"),
                    "change_type": kind,
                    "session_id": session_id,
                    "turn_id": change.get("turn_id"),
                    "error": _error_text(change.get("turn")),
                },
            },
        }
        if link is not None:
            event["links"] = [{"href": link, "text": "Session in the relay dashboard"}]
        bodies.append(orjson.dumps(event))
    return bodies


def _pd_summary(change: dict[str, Any], action: AlertAction) -> str:
    if action.action is Action.TRIGGER:
        return summary(change)
    return f"resolved by {summary(change)}"


def test_event_pagerduty(message_id: str, routing_key: str, now: float) -> list[bytes]:
    """A test event: a trigger and its resolve, so no incident stays open."""
    key = f"relay/test/{message_id}"
    change = {"type": "webhook.test", "occurred_at": format_unix(now), "session_id": None}
    return render_pagerduty(
        change,
        (AlertAction(Action.TRIGGER, key), AlertAction(Action.RESOLVE, key)),
        routing_key,
        None,
    )
