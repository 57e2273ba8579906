"""Which deliveries a page of the change log makes, the same for both stores' queues.

A change goes to every subscription (enabled or not: a disabled one's deliveries wait
until it is enabled) that it comes after the start of and whose filter accepts it. To a
PagerDuty subscription it goes only if it triggers or resolves an incident: the
subscription's open incidents decide, and change as the page goes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from relay.webhooks.formats import Format, actions_json, decide_actions, incident_effect
from relay.webhooks.model import ChangeFilter

# (subscription id, filter, the change id it starts after, format)
Target = tuple[str, ChangeFilter, int, str]
# (subscription id, change id, type, session id, alert actions as JSON or None)
DeliveryRow = tuple[str, int, str, str | None, str | None]


def _accepted(
    changes: Sequence[Sequence[Any]], targets: Sequence[Target]
) -> Iterator[tuple[Sequence[Any], Target]]:
    """Each change (id, type, session id, turn id) with each subscription that takes it."""
    for change in changes:
        change_id, change_type, session_id = change[0], change[1], change[2]
        for target in targets:
            if change_id > target[2] and target[1](change_type, session_id):
                yield change, target


def incidents_needed(changes: Sequence[Sequence[Any]], targets: Sequence[Target]) -> list[str]:
    """The PagerDuty subscriptions whose open incidents `fan_out` reads for `changes`."""
    return sorted({t[0] for _, t in _accepted(changes, targets) if t[3] == Format.PAGERDUTY})


def fan_out(
    changes: Sequence[Sequence[Any]],
    targets: Sequence[Target],
    incidents: Mapping[str, dict[str, int]],
) -> tuple[list[DeliveryRow], dict[str, int]]:
    """The deliveries `changes` make, in change order, and how many per subscription.
    `incidents` holds the open incidents (dedup key: change id) of the subscriptions
    `incidents_needed` names, and is updated in place."""
    rows: list[DeliveryRow] = []
    counts: dict[str, int] = {}
    for (change_id, change_type, session_id, turn_id), (sid, _, _, fmt) in _accepted(
        changes, targets
    ):
        actions = None
        if fmt == Format.PAGERDUTY:
            effect = incident_effect(change_type, session_id, turn_id)
            decided = decide_actions(effect, incidents[sid], change_id)
            if not decided:
                continue  # neither triggers nor resolves: not sent
            actions = actions_json(decided)
        rows.append((sid, change_id, change_type, session_id, actions))
        counts[sid] = counts.get(sid, 0) + 1
    return rows, counts
