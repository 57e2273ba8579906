"""Which deliveries a page of changes makes: filters, start points and incidents."""

from __future__ import annotations

import orjson

from relay.webhooks.fan_out import fan_out, incidents_needed
from relay.webhooks.model import ChangeFilter

EVERYTHING = ChangeFilter((), ())
CHANGES = [
    (1, "session.ready_timeout", "chat_a", None),
    (2, "turn.started", "chat_a", "turn_1"),
    (3, "session.ready", "chat_a", None),
    (4, "session.ready", "chat_b", None),
]


def test_a_change_goes_to_each_subscription_that_takes_it_after_its_start() -> None:
    """Filters and start points choose; rows come in change order, counted per subscription."""
    targets = [
        ("all", EVERYTHING, 0, "standard"),
        ("late", EVERYTHING, 2, "slack"),
        ("b", ChangeFilter((), ("chat_b",)), 0, "standard"),
    ]
    rows, counts = fan_out(CHANGES, targets, {})
    assert [(sid, cid) for sid, cid, *_ in rows] == [
        ("all", 1),
        ("all", 2),
        ("all", 3),
        ("late", 3),
        ("all", 4),
        ("late", 4),
        ("b", 4),
    ]
    assert counts == {"all": 4, "late": 2, "b": 1}
    assert all(actions is None for *_, actions in rows)
    assert incidents_needed(CHANGES, targets) == []


def test_a_pagerduty_subscription_gets_only_triggers_and_resolves_of_open_incidents() -> None:
    """A timeout triggers, the session's readiness resolves it, other changes are not
    sent, and a readiness with no incident open resolves nothing; the open incidents are
    left as the page leaves them."""
    targets = [("pd", EVERYTHING, 0, "pagerduty")]
    assert incidents_needed(CHANGES, targets) == ["pd"]
    incidents: dict[str, dict[str, int]] = {"pd": {}}
    rows, counts = fan_out(CHANGES, targets, incidents)
    sent = [(cid, orjson.loads(actions or "null")) for _, cid, _, _, actions in rows]
    assert sent == [
        (1, [["trigger", "relay/chat_a/ready_timeout"]]),
        (3, [["resolve", "relay/chat_a/ready_timeout"]]),
    ]
    assert counts == {"pd": 2}
    assert incidents == {"pd": {}}
    open_before = {"pd": {"relay/chat_b/ready_timeout": 0}}
    rows, _ = fan_out(CHANGES[3:], targets, open_before)
    assert [orjson.loads(actions or "null") for *_, actions in rows] == [
        [["resolve", "relay/chat_b/ready_timeout"]]
    ]
    assert open_before == {"pd": {}}
