"""Every provider's fixture session derives its expected state in any order."""

from __future__ import annotations

import random

import orjson
import pytest

from relay.normalize import normalise_generic
from relay.providers.canonical import encode
from relay.state import derive_session
from tests.provider_fixtures import PROVIDERS, expected, observed, stored_events


@pytest.mark.parametrize("provider", PROVIDERS)
def test_fixture_gives_expected_state_in_any_order(provider: str) -> None:
    """In order, reversed and in 50 random orders with duplicates, the state is expected."""
    events = stored_events(provider)
    want = expected(provider)
    rng = random.Random(provider)
    orders = [events, events[::-1]]
    for _ in range(50):
        order = [*events, *rng.choices(events, k=rng.randint(1, len(events)))]
        rng.shuffle(order)
        orders.append(order)
    for order in orders:
        sessions = {e.session_id for e in order if e.session_id}
        assert sessions == {want["session_id"]}
        record = derive_session(order)
        assert record is not None
        assert observed(record, want) == want


FIELDS = (
    "id",
    "type",
    "occurred_at",
    "session_id",
    "turn_id",
    "usage",
    "error",
    "active_turn_id",
    "retry_after_seconds",
    "tool_call_id",
    "tool_name",
    "provider",
)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_stored_form_reads_back_as_the_same_events(provider: str) -> None:
    """What the store keeps of each event reads back as the event the provider made."""
    for event in stored_events(provider):
        again = normalise_generic(event.source, orjson.loads(encode(event)), event.occurred_at)
        assert (
            again.id,
            again.type,
            again.session_id,
            again.turn_id,
            again.usage,
            again.error,
        ) == (event.id, event.type, event.session_id, event.turn_id, event.usage, event.error)
        assert (again.tool_call_id, again.tool_name, again.occurred_at) == (
            event.tool_call_id,
            event.tool_name,
            event.occurred_at,
        )
