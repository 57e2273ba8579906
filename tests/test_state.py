"""The session state machine: order independence, changes and persistence."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.events import Event, EventType, TurnError, Usage
from relay.state import (
    ChangeType,
    Readiness,
    SessionRecord,
    TurnStatus,
    alert_deadlines,
    apply,
    derive_session,
)
from tests.conftest import FIXTURES, LIFECYCLE_CHANGES

RAW = json.loads((FIXTURES / "session_lifecycle.json").read_text())
EXPECTED = json.loads((FIXTURES / "session_lifecycle.expected.json").read_text())
SESSION = "chat_01JD7Q8M2X"
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def casedev_event(raw: dict[str, Any]) -> Event:
    data = raw["data"]
    usage, error = data.get("usage"), data.get("error")
    return Event(
        source="casedev",
        id=raw["id"],
        type=raw["type"],
        occurred_at=datetime.fromisoformat(raw["occurred_at"]),
        session_id=data.get("chatId"),
        turn_id=data.get("turnId"),
        data=data,
        usage=None
        if usage is None
        else Usage(
            input_tokens=usage.get("inputTokens", 0),
            output_tokens=usage.get("outputTokens", 0),
            cost_micros=usage.get("costMicros", 0),
        ),
        error=None if error is None else TurnError(error["message"], error.get("code")),
        active_turn_id=data.get("activeTurnId"),
        retry_after_seconds=data.get("retryAfter"),
    )


FIXTURE = [casedev_event(raw) for raw in RAW]


def event(
    kind: str, seconds: float, turn: str | None = None, eid: str | None = None, **extra: Any
) -> Event:
    at = T0 + timedelta(seconds=seconds)
    eid = eid or f"evt_{kind}_{turn}_{seconds}"
    return Event("casedev", eid, kind, at, session_id=SESSION, turn_id=turn, **extra)


def fold(events: Iterable[Event]) -> SessionRecord:
    record = derive_session(events)
    assert record is not None
    return record


def matches_expected(record: SessionRecord) -> None:
    state = record.session.to_dict()
    for key, want in EXPECTED.items():
        if key == "turns":
            assert {tid: t.status for tid, t in record.turns.items()} == want
        elif key == "usage":
            assert {k: state["usage"][k] for k in want} == want
        else:
            assert state[key] == want, key


def test_fixture_in_order_and_reversed() -> None:
    """The fixture gives the expected state in order and reversed."""
    matches_expected(fold(FIXTURE))
    matches_expected(fold(reversed(FIXTURE)))


def test_fixture_in_random_orders_with_duplicates() -> None:
    """Any arrival order with any duplicates gives the expected state."""
    rng = random.Random(20261120)
    in_order = without_versions(fold(FIXTURE))
    for _ in range(50):
        arrival = FIXTURE + rng.choices(FIXTURE, k=rng.randint(0, 12))
        rng.shuffle(arrival)
        record = fold(arrival)
        matches_expected(record)
        assert without_versions(record) == in_order


def test_fixture_fields() -> None:
    """The fixture's session carries timestamps, usage and its last turn."""
    state = fold(FIXTURE).session.to_dict()
    assert state["created_at"] == "2026-11-20T09:00:00.000Z"
    assert state["ready_at"] == "2026-11-20T09:00:02.100Z"
    assert state["first_event_at"] == "2026-11-20T09:00:00.000Z"
    assert state["last_event_at"] == "2026-11-20T09:01:30.500Z"
    assert state["usage"] == {
        "input_tokens": 5120,
        "output_tokens": 812,
        "reasoning_tokens": 0,
        "total_tokens": 0,
        "cost_micros": 27600,
    }
    assert state["last_turn"]["turn_id"] == "turn_002"
    assert state["last_turn"]["error"] == {
        "message": "vault search timed out",
        "code": "TOOL_TIMEOUT",
    }
    assert state["last_turn"]["duration_ms"] == 30500


# --- changes ---------------------------------------------------------------------------


def changes_of(events: Iterable[Event]) -> list[str]:
    record: SessionRecord | None = None
    types: list[str] = []
    for e in events:
        record, changes = apply(record, e)
        types += [c.type for c in changes]
    return types


def test_fixture_changes_in_order() -> None:
    """The fixture in order emits one change per status transition."""
    assert changes_of(FIXTURE) == LIFECYCLE_CHANGES


def test_versions_count_snapshot_changes() -> None:
    """Session and turn versions grow by one per snapshot change."""
    record = fold(FIXTURE)
    assert record.session.version == len(FIXTURE)
    assert record.turns["turn_001"].version == 2
    assert record.turns["turn_003"].version == 1
    assert record.session.last_turn == record.turns["turn_002"]


def test_duplicates_change_nothing() -> None:
    """Duplicate events change nothing."""
    record = fold(FIXTURE)
    for e in FIXTURE:
        again, changes = apply(record, e)
        assert again is record
        assert changes == []


def test_late_started_after_completed() -> None:
    """A late turn.started after completed emits nothing and keeps the turn completed."""
    record, _ = apply(None, event(EventType.TURN_COMPLETED, 10, "t1"))
    assert record is not None
    version = record.turns["t1"].version
    record, changes = apply(record, event(EventType.TURN_STARTED, 4, "t1"))
    assert changes == []
    turn = record.turns["t1"]
    assert turn.status == TurnStatus.COMPLETED
    assert turn.duration_ms == 6000
    assert turn.version == version + 1


def test_older_runtime_event_changes_nothing() -> None:
    """A runtime event older than the last worker-ready leaves the session ready."""
    record = fold(FIXTURE)
    late = event(EventType.RUNTIME_REUSED, 1.0, eid="evt_late_runtime")
    after, changes = apply(record, late)
    assert changes == []
    assert after.session == record.session


def test_runtime_after_ready_reprovisions() -> None:
    """A runtime reuse after ready makes the session provisioning until the next ready."""
    record = fold(FIXTURE)
    record, changes = apply(record, event(EventType.RUNTIME_REUSED, 200))
    assert [c.type for c in changes] == [ChangeType.SESSION_PROVISIONING]
    assert record.session.readiness == Readiness.PROVISIONING
    assert record.session.worker_ready is False
    record, changes = apply(record, event(EventType.WORKER_READY, 201))
    assert [c.type for c in changes] == [ChangeType.SESSION_READY]
    assert record.session.time_to_ready_ms == 2100


def test_scope_after_ready_reprovisions() -> None:
    """A scope activation after the last worker-ready makes the session provisioning."""
    record, changes = apply(fold(FIXTURE), event(EventType.SCOPE_ACTIVATED, 3))
    assert [c.type for c in changes] == [ChangeType.SESSION_PROVISIONING]
    record, changes = apply(record, event(EventType.WORKER_READY, 3))
    assert [c.type for c in changes] == [ChangeType.SESSION_READY]


def test_each_provisioning_step_is_a_change() -> None:
    """While provisioning, each new readiness detail is a `session.provisioning` change
    carrying it; a repeat of a step, or a turn event, is not; ready comes once."""
    record, changes = apply(None, event(EventType.SESSION_CREATED, 0))
    assert [c.type for c in changes] == [ChangeType.SESSION_CREATED]
    assert record is not None
    steps = [
        (EventType.RUNTIME_REUSED, 1, "runtime_reused", True),
        (EventType.SCOPE_ACTIVATED, 2, "scope_activated", True),
    ]
    for kind, at, detail, value in steps:
        record, changes = apply(record, event(kind, at))
        assert [c.type for c in changes] == [ChangeType.SESSION_PROVISIONING]
        assert changes[0].to_dict()["session"][detail] == value
        assert record.session.readiness == Readiness.PROVISIONING
    record, changes = apply(record, event(EventType.RUNTIME_REUSED, 1.5))  # same detail
    assert changes == []
    record, changes = apply(record, event(EventType.TURN_STARTED, 1.6, "t0"))
    assert [c.type for c in changes] == [ChangeType.TURN_STARTED]
    record, changes = apply(record, event(EventType.WORKER_READY, 3))
    assert [c.type for c in changes] == [ChangeType.SESSION_READY]


def test_worker_ready_first() -> None:
    """A session whose first event is worker-ready is created ready."""
    assert changes_of([event(EventType.WORKER_READY, 1)]) == ["session.created", "session.ready"]


@pytest.mark.parametrize("first", [EventType.TURN_COMPLETED, EventType.TURN_FAILED])
def test_terminal_tie_goes_to_failed(first: str) -> None:
    """Completed and failed at the same instant give failed in either order."""
    other = EventType.TURN_FAILED if first == EventType.TURN_COMPLETED else EventType.TURN_COMPLETED
    record = fold([event(first, 5, "t1"), event(other, 5, "t1")])
    assert record.turns["t1"].status == TurnStatus.FAILED


def test_newer_terminal_wins() -> None:
    """Between two terminal events the newer wins."""
    events = [event(EventType.TURN_FAILED, 5, "t1"), event(EventType.TURN_COMPLETED, 6, "t1")]
    assert fold(events).turns["t1"].status == TurnStatus.COMPLETED
    assert changes_of(events)[-1] == "turn.completed"


def test_conflict_then_started_runs() -> None:
    """A turn id started again after its conflict is running, without conflict details."""
    conflict = event(EventType.TURN_CONFLICT, 5, "t2", active_turn_id="t1", retry_after_seconds=5)
    record = fold([conflict])
    assert record.turns["t2"].active_turn_id == "t1"
    assert record.turns["t2"].retry_after_seconds == 5
    record, changes = apply(record, event(EventType.TURN_STARTED, 10, "t2"))
    assert [c.type for c in changes] == [ChangeType.TURN_STARTED]
    assert record.turns["t2"].status == TurnStatus.RUNNING
    assert record.turns["t2"].active_turn_id is None
    assert record.session.active_turn_id == "t2"


def test_active_turn_is_newest_running() -> None:
    """With several running turns the one started last is active."""
    record = fold([event(EventType.TURN_STARTED, 9, "t1"), event(EventType.TURN_STARTED, 3, "t2")])
    assert record.session.turn_status == "running"
    assert record.session.active_turn_id == "t1"


def test_ignored_events() -> None:
    """Unknown types, and events without a session or turn id, change nothing."""
    unknown = event("agent.something.else", 1)
    no_turn = event(EventType.TURN_STARTED, 1)
    no_session = Event("casedev", "evt_x", EventType.WORKER_READY, T0)
    for e in (unknown, no_turn, no_session):
        assert apply(None, e) == (None, [])
    record = fold(FIXTURE)
    assert apply(record, unknown) == (record, [])


def test_other_session_is_refused() -> None:
    """An event of another session cannot be applied to a record."""
    other = Event("casedev", "evt_other", EventType.WORKER_READY, T0, session_id="chat_other")
    with pytest.raises(ValueError, match="chat_other"):
        apply(fold(FIXTURE), other)


def test_change_to_dict() -> None:
    """A change serialises to JSON with its snapshots and cause."""
    record, _ = apply(None, FIXTURE[0])
    assert record is not None
    _, changes = apply(record, FIXTURE[4])
    data = json.loads(json.dumps(changes[0].to_dict()))
    assert data["type"] == "turn.started"
    assert data["occurred_at"] == "2026-11-20T09:00:05.000Z"
    assert data["turn_id"] == "turn_001"
    assert data["turn"]["status"] == "running"
    assert data["session"]["active_turn_id"] == "turn_001"
    assert data["cause"] == {
        "event_id": "evt_01JD7Q0005",
        "source": "casedev",
        "type": "agent.chat.turn.started",
    }


def test_record_json_round_trip() -> None:
    """A record survives a JSON round trip and resumes exactly where it stopped."""
    half = fold(FIXTURE[:6])
    restored = SessionRecord.from_json(json.loads(json.dumps(half.to_json())))
    assert restored == half
    for e in FIXTURE[6:]:
        half, expected = apply(half, e)
        restored, changes = apply(restored, e)
        assert changes == expected
    assert restored == half == fold(FIXTURE)


def test_alert_deadlines() -> None:
    """Deadlines follow the provisioning start and the running turn's start."""
    record = fold([event(EventType.SESSION_CREATED, 0), event(EventType.TURN_STARTED, 5, "t1")])
    deadlines = {(d.type, d.turn_id): d.at for d in alert_deadlines(record, 600, 120)}
    assert deadlines == {
        (ChangeType.SESSION_READY_TIMEOUT, None): T0 + timedelta(seconds=120),
        (ChangeType.TURN_STALLED, "t1"): T0 + timedelta(seconds=605),
    }
    record = fold([*FIXTURE, event(EventType.RUNTIME_REUSED, 300)])
    assert [(d.type, d.at) for d in alert_deadlines(record, 600, 120)] == [
        (ChangeType.SESSION_READY_TIMEOUT, T0 + timedelta(seconds=420))
    ]


# --- properties ------------------------------------------------------------------------

TURN_TYPES = {
    EventType.TURN_STARTED,
    EventType.TURN_COMPLETED,
    EventType.TURN_FAILED,
    EventType.TURN_CONFLICT,
    EventType.TOOL_STARTED,
    EventType.TOOL_COMPLETED,
    EventType.TURN_ACTIVITY,
}
KINDS = [*EventType, *TURN_TYPES, *TURN_TYPES, "agent.unknown"]


@st.composite
def lifecycles(draw: st.DrawFn) -> list[Event]:
    events = []
    for i in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(KINDS))
        extra: dict[str, Any] = {}
        if kind in (EventType.TURN_COMPLETED, EventType.TURN_FAILED) and draw(st.booleans()):
            numbers = st.integers(0, 1000)
            extra["usage"] = Usage(*(draw(numbers) for _ in range(5)))
        if kind == EventType.TURN_FAILED and draw(st.booleans()):
            extra["error"] = TurnError(f"boom {i}", draw(st.none() | st.just("E_TOOL")))
        if kind in (EventType.TOOL_STARTED, EventType.TOOL_COMPLETED):
            extra["tool_call_id"] = draw(st.sampled_from(["call_1", "call_2"]))
            extra["tool_name"] = draw(st.sampled_from(["search", "ocr"]))
        if kind == EventType.TURN_CONFLICT:
            extra["active_turn_id"] = draw(st.sampled_from(["t1", "t2", "t3"]))
            extra["retry_after_seconds"] = draw(st.none() | st.integers(1, 9))
        events.append(
            Event(
                source=draw(st.sampled_from(["casedev", "other"])),
                id=f"evt_{i:03d}",
                type=kind,
                occurred_at=T0 + timedelta(milliseconds=500 * draw(st.integers(0, 6))),
                session_id=draw(st.sampled_from(["chat_a", "chat_b", "chat_c"])),
                turn_id=draw(st.sampled_from(["t1", "t2", "t3"])) if kind in TURN_TYPES else None,
                **extra,
            )
        )
    return events


def ingest(events: Iterable[Event]) -> dict[str, SessionRecord]:
    records: dict[str, SessionRecord] = {}
    for e in events:
        assert e.session_id is not None
        record, _ = apply(records.get(e.session_id), e)
        if record is not None:
            records[e.session_id] = record
    return records


def strip_version(data: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in data.items() if k != "version"}
    if data.get("last_turn"):
        data["last_turn"] = strip_version(data["last_turn"])
    return data


def without_versions(record: SessionRecord) -> dict[str, Any]:
    return {
        "session": strip_version(record.session.to_dict()),
        "turns": {tid: strip_version(t.to_dict()) for tid, t in record.turns.items()},
    }


def iso(at: datetime | None) -> str | None:
    return None if at is None else at.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Usage | TurnError):
        return dataclasses.asdict(value)
    return value


def ms(delta: timedelta) -> int:
    return max(0, int(delta.total_seconds() * 1000))


def reference(session_id: str, events: list[Event]) -> dict[str, Any] | None:
    """The SPEC's rules applied to the whole set of one session's events at once."""
    unique = {(e.source, e.id): e for e in events}.values()
    known = [
        e for e in unique if e.type in set(EventType) and (e.type not in TURN_TYPES or e.turn_id)
    ]
    if not known:
        return None

    def times(*kinds: str, among: Iterable[Event] = known) -> list[datetime]:
        return sorted(e.occurred_at for e in among if e.type in kinds)

    def last(kinds: Iterable[str], among: Iterable[Event]) -> Event | None:
        found = sorted(
            (e for e in among if e.type in kinds), key=lambda e: (e.occurred_at, e.id, e.source)
        )
        return found[-1] if found else None

    runtime = last({EventType.RUNTIME_REUSED, EventType.RUNTIME_STARTED}, known)
    ready = times(EventType.WORKER_READY)
    runtimes = times(EventType.RUNTIME_REUSED, EventType.RUNTIME_STARTED)
    scopes = times(EventType.SCOPE_ACTIVATED)
    created = times(EventType.SESSION_CREATED) or [min(e.occurred_at for e in known)]
    turns: dict[str, dict[str, Any]] = {}
    for tid in sorted({e.turn_id for e in known if e.turn_id}):
        mine = [e for e in known if e.turn_id == tid]
        starts = times(EventType.TURN_STARTED, among=mine)
        conflict = last({EventType.TURN_CONFLICT}, mine)
        ends = sorted(
            (e for e in mine if e.type in (EventType.TURN_COMPLETED, EventType.TURN_FAILED)),
            key=lambda e: (e.occurred_at, e.type == EventType.TURN_FAILED, e.id, e.source),
        )
        end = ends[-1] if ends else None
        if end is not None:
            status = "failed" if end.type == EventType.TURN_FAILED else "completed"
        elif conflict and (not starts or conflict.occurred_at >= starts[-1]):
            status = "conflict"
        else:
            status = "running"
        with_usage = [e for e in mine if e.usage is not None]
        usage = last({e.type for e in with_usage}, with_usage)
        first = starts[-1] if starts else None
        shown = conflict if status == "conflict" else None
        tools = {
            kind: {(e.tool_call_id, e.tool_name or "") for e in mine if e.type == kind}
            for kind in (EventType.TOOL_STARTED, EventType.TOOL_COMPLETED)
        }
        ended = {call_id for call_id, _ in tools[EventType.TOOL_COMPLETED] if call_id}
        started = {call_id for call_id, _ in tools[EventType.TOOL_STARTED] if call_id}
        running: dict[str, str] = {}
        for call_id, name in sorted(c for c in tools[EventType.TOOL_STARTED] if c[0]):
            if status == "running" and call_id not in ended:
                running.setdefault(call_id, name)
        turns[tid] = {
            "session_id": session_id,
            "turn_id": tid,
            "status": status,
            "started_at": first,
            "ended_at": end and end.occurred_at,
            "duration_ms": ms(end.occurred_at - first) if end and first else None,
            "usage": usage and usage.usage,
            "error": end.error if end and status == "failed" else None,
            "active_turn_id": shown and shown.active_turn_id,
            "retry_after_seconds": shown and shown.retry_after_seconds,
            "updated_at": max(e.occurred_at for e in mine),
            "tool_calls": {"count": len(started | ended), "running": list(running.values())},
        }
    running = [t for t in turns.values() if t["status"] == "running"]
    active = max(
        running, key=lambda t: (t["started_at"] or t["updated_at"], t["turn_id"]), default=None
    )
    latest = max(turns.values(), key=lambda t: (t["updated_at"], t["turn_id"]), default=None)
    usages = [t["usage"] for t in turns.values() if t["usage"]]
    counts = [t["status"] for t in turns.values()]
    is_ready = bool(ready) and all(t <= ready[-1] for t in runtimes + scopes)

    def out(turn: dict[str, Any]) -> dict[str, Any]:
        return {k: plain(v) for k, v in turn.items()}

    return {
        "session": {
            "session_id": session_id,
            "provider": ",".join(sorted({e.provider for e in known if e.provider})) or None,
            "readiness": "ready" if is_ready else "provisioning",
            "runtime_reused": None if runtime is None else runtime.type == EventType.RUNTIME_REUSED,
            "scope_activated": bool(scopes),
            "worker_ready": bool(ready) and all(t <= ready[-1] for t in runtimes),
            "created_at": iso(created[0]),
            "ready_at": iso(ready[0]) if ready else None,
            "time_to_ready_ms": ms(ready[0] - created[0]) if ready else None,
            "turn_status": "running" if running else "idle",
            "active_turn_id": active and active["turn_id"],
            "last_turn": latest and out(latest),
            "counts": {
                "turns": len(counts),
                "completed": counts.count("completed"),
                "failed": counts.count("failed"),
                "conflicts": counts.count("conflict"),
            },
            "usage": {
                f.name: sum(getattr(u, f.name) for u in usages) for f in dataclasses.fields(Usage)
            },
            "first_event_at": iso(min(e.occurred_at for e in known)),
            "last_event_at": iso(max(e.occurred_at for e in known)),
        },
        "turns": {tid: out(t) for tid, t in turns.items()},
    }


@settings(max_examples=200, deadline=None)
@given(events=lifecycles(), data=st.data())
def test_any_order_with_duplicates_matches_reference(
    events: list[Event], data: st.DataObject
) -> None:
    """Any permutation with duplicates derives the same state as the SPEC reference."""
    order = data.draw(st.permutations(events))
    extra = data.draw(st.lists(st.tuples(st.sampled_from(events), st.integers(0, len(events)))))
    arrival = list(order)
    for e, at in extra:
        arrival.insert(at, e)
    in_order, shuffled = ingest(events), ingest(arrival)
    derived = {sid: without_versions(r) for sid, r in shuffled.items()}
    assert derived == {sid: without_versions(r) for sid, r in in_order.items()}
    sessions = {e.session_id for e in events if e.session_id}
    expected = {sid: reference(sid, [e for e in events if e.session_id == sid]) for sid in sessions}
    assert derived == {sid: state for sid, state in expected.items() if state is not None}
    for record in shuffled.values():
        assert SessionRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
