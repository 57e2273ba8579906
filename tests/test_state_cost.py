"""What one event costs the state machine does not grow with the session's turns."""

from __future__ import annotations

import gc
import sys
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.events import Event, EventType
from relay.sorted_keys import SortedKeys
from relay.state import (
    SessionRecord,
    alert_deadline_changes,
    alert_deadlines,
    apply,
)
from tests.test_state import lifecycles

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
STALL, TIMEOUT = 600.0, 120.0


def turn_event(kind: str, second: int, turn: str) -> Event:
    at = T0 + timedelta(seconds=second)
    return Event("casedev", f"evt_{kind}_{turn}", kind, at, session_id="chat_big", turn_id=turn)


def session_of(running: int, completed: int) -> SessionRecord:
    """A ready session with `running` turns that never end and `completed` ones."""
    record, _ = apply(None, turn_event(EventType.WORKER_READY, 0, ""))
    assert record is not None
    for n in range(completed):
        record, _ = apply(record, turn_event(EventType.TURN_STARTED, n, f"done_{n:05d}"))
        record, _ = apply(record, turn_event(EventType.TURN_COMPLETED, n, f"done_{n:05d}"))
    for n in range(running):
        record, _ = apply(record, turn_event(EventType.TURN_STARTED, n, f"stuck_{n:05d}"))
    return record


def next_turn(record: SessionRecord) -> SessionRecord:
    """A new turn starts and completes; the session is back to what it was running."""
    turn = f"new_{record.session.counts.turns}"
    started, _ = apply(record, turn_event(EventType.TURN_STARTED, 90_000, turn))
    assert started.session.active_turn_id == turn
    added, removed = alert_deadline_changes(record, started, [turn], STALL, TIMEOUT)
    assert [d.turn_id for d in added] == [turn]
    assert removed == []
    done, _ = apply(started, turn_event(EventType.TURN_COMPLETED, 90_001, turn))
    added, removed = alert_deadline_changes(started, done, [turn], STALL, TIMEOUT)
    assert added == []
    assert [d.turn_id for d in removed] == [turn]
    return done


def python_calls(work: Callable[[], Any]) -> int:
    """How many Python functions `work` calls, all the way down."""
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    # A collection during `work` would run other objects' finalizers (a socket another
    # test left, say) and count their calls: collect first, and not meanwhile.
    gc.collect()
    gc.disable()
    sys.setprofile(count)
    try:
        work()
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


def allocated(work: Callable[[], Any]) -> int:
    """The most memory `work` held at once beyond what was held before it."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def test_event_work_does_not_grow_with_running_turns() -> None:
    """A turn starting and ending calls about as many functions beside 5,000 stuck turns
    as beside 10, and the active turn is the newest running one."""
    small, large = session_of(10, 0), session_of(5_000, 0)
    assert large.session.active_turn_id == "stuck_04999"
    small_calls = python_calls(lambda: next_turn(small))
    large_calls = python_calls(lambda: next_turn(large))
    assert large_calls < small_calls * 1.5, (small_calls, large_calls)
    after = next_turn(large)
    assert after.session.active_turn_id == "stuck_04999"
    assert after.session.counts.turns == 5_001
    assert after.session.counts.completed == 1


def test_event_memory_does_not_grow_with_completed_turns() -> None:
    """One event in a session of 10,000 completed turns allocates about what it does in
    one of 10: no map of all the turns is copied."""
    small, large = session_of(0, 10), session_of(0, 10_000)
    small_bytes = allocated(lambda: next_turn(small))
    large_bytes = allocated(lambda: next_turn(large))
    assert large_bytes < max(3 * small_bytes, 64 * 1024), (small_bytes, large_bytes)
    assert python_calls(lambda: next_turn(large)) < 1.5 * python_calls(lambda: next_turn(small))


def test_records_an_event_changed_stay_as_they_were() -> None:
    """Applying an event leaves the record it started from unchanged (a batch can be
    abandoned and its records used again)."""
    record = session_of(3, 3)
    before = record.to_json()
    next_turn(record)
    apply(record, turn_event(EventType.TURN_COMPLETED, 99_000, "stuck_00001"))
    assert record.to_json() == before
    assert record.session.active_turn_id == "stuck_00002"


@settings(max_examples=200, deadline=None)
@given(events=lifecycles())
def test_deadline_changes_match_the_difference_of_all_deadlines(events: list[Event]) -> None:
    """The deadlines an event adds and removes are what the full lists differ by."""
    records: dict[str, SessionRecord] = {}
    for event in events:
        assert event.session_id is not None
        old = records.get(event.session_id)
        new, _ = apply(old, event)
        if new is None:
            continue
        records[event.session_id] = new
        turns = [event.turn_id] if event.turn_id is not None else []
        added, removed = alert_deadline_changes(old, new, turns, STALL, TIMEOUT)
        before = set() if old is None else set(alert_deadlines(old, STALL, TIMEOUT))
        after = set(alert_deadlines(new, STALL, TIMEOUT))
        assert set(added) == after - before
        assert set(removed) == before - after


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=120))
def test_sorted_keys_behave_as_a_sorted_set(ops: list[tuple[bool, int]]) -> None:
    """SortedKeys holds what a set would, in order, and old versions stay as they were."""
    keys: SortedKeys[int] = SortedKeys()
    model: set[int] = set()
    history = []
    for add, key in ops:
        keys = keys.add(key) if add else keys.remove(key)
        model = model | {key} if add else model - {key}
        history.append((keys, sorted(model)))
    for version, want in history:
        assert list(version) == want
        assert len(version) == len(want)
        assert version.max() == (want[-1] if want else None)
