"""A batch's alert bookkeeping looks only at the turns it touched."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.events import Event, EventType
from relay.state import SessionRecord
from relay.store import IngestRecord
from relay.store.derive import SessionEntry, Thresholds, derive_batch, entry_of, wanted_alerts
from tests.test_state import lifecycles
from tests.test_state_cost import python_calls, session_of, turn_event

THRESHOLDS = Thresholds(600.0, 120.0)
RECEIVED = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def ingest(event: Event) -> IngestRecord:
    return IngestRecord(event, b'{"id": "%s"}' % event.id.encode(), RECEIVED)


def batch_calls(record: SessionRecord) -> int:
    """Python calls made to derive one new turn's start in the session of `record`."""
    entry = entry_of(record, 1, (), THRESHOLDS)
    event = turn_event(EventType.TURN_STARTED, 95_000, "one_more")
    return python_calls(
        lambda: derive_batch([ingest(event)], {}, 10_000, lambda sid: entry, THRESHOLDS)
    )


def test_a_batch_costs_the_same_with_many_running_turns() -> None:
    """Deriving a batch makes as many calls with 2,000 running turns as with 5."""
    few = batch_calls(session_of(running=5, completed=0))
    many = batch_calls(session_of(running=2_000, completed=0))
    assert many <= few + 20, (few, many)


@settings(max_examples=150, deadline=None)
@given(events=lifecycles(), size=st.integers(1, 4))
def test_alert_rows_follow_what_the_state_calls_for(events: list[Event], size: int) -> None:
    """Alert rows written batch by batch are always the alerts the state calls for."""
    entries: dict[str, SessionEntry] = {}
    rows: set[tuple[str, str, str]] = set()
    for start in range(0, len(events), size):
        batch = [ingest(event) for event in events[start : start + size]]

        def lookup(session_id: str) -> SessionEntry:
            return entries.get(session_id) or SessionEntry(None)

        derived = derive_batch(batch, {}, start, lookup, THRESHOLDS)
        rows -= set(derived.alert_deletes)
        rows |= {(sid, turn, kind) for sid, turn, kind, _ in derived.alert_inserts}
        entries.update(derived.entries)
        for session_id, entry in entries.items():
            assert entry.record is not None
            wanted = wanted_alerts(entry.record, THRESHOLDS)
            assert set(entry.alerts) == wanted
            assert {(turn, kind) for sid, turn, kind in rows if sid == session_id} == {
                (turn, kind) for kind, turn in wanted
            }
