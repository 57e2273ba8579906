"""The state machine over events of every provider mixed: order and duplicates do not matter."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.events import Event
from relay.state import SessionRecord
from tests.provider_fixtures import (
    PROVIDERS,
    expected,
    request_events,
    requests,
    source_settings,
)
from tests.test_state import T0, ingest, reference, without_versions

SESSIONS = ("chat_a", "chat_b")
SOURCES = {provider: source_settings(provider) for provider in PROVIDERS}
REQUESTS = {provider: requests(provider) for provider in PROVIDERS}
SESSION_OF = {provider: expected(provider)["session_id"] for provider in PROVIDERS}


@st.composite
def mixed_events(draw: st.DrawFn) -> list[Event]:
    """Requests of every provider's fixture, some left out, moved to a shared session and
    received at other times; the events the store would keep (first of each id)."""
    kept: dict[tuple[str, str], Event] = {}
    for provider in PROVIDERS:
        items = REQUESTS[provider]
        chosen = draw(st.lists(st.integers(0, len(items) - 1), unique=True, max_size=len(items)))
        for index in chosen:
            session = draw(st.sampled_from(SESSIONS))
            item = items[index]
            moved = dataclasses.replace(
                item,
                body=item.body.replace(SESSION_OF[provider].encode(), session.encode()),
                session_id=session if item.session_id else None,
                received_at=T0 + timedelta(seconds=draw(st.integers(0, 90))),
            )
            for event in request_events(SOURCES[provider], moved):
                kept.setdefault((event.source, event.id), event)
    return list(kept.values())


@settings(max_examples=150, deadline=None)
@given(events=mixed_events(), data=st.data())
def test_every_provider_mixed_matches_reference(events: list[Event], data: st.DataObject) -> None:
    """Events of all providers, in any order with duplicates, derive the reference state."""
    order = data.draw(st.permutations(events))
    arrival = list(order)
    if events:
        repeats = st.tuples(st.sampled_from(events), st.integers(0, len(events)))
        for event, at in data.draw(st.lists(repeats)):
            arrival.insert(at, event)
    in_order, shuffled = ingest(events), ingest(arrival)
    derived = {sid: without_versions(r) for sid, r in shuffled.items()}
    assert derived == {sid: without_versions(r) for sid, r in in_order.items()}
    sessions = {e.session_id for e in events if e.session_id}
    want = {sid: reference(sid, [e for e in events if e.session_id == sid]) for sid in sessions}
    assert derived == {sid: state for sid, state in want.items() if state is not None}
    for record in shuffled.values():
        assert SessionRecord.from_json(record.to_json()) == record
