"""One store contract, run against the embedded SQLite store and the PostgreSQL store."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from relay.config import AlertSettings, StoreSettings
from relay.normalize import normalise_casedev
from relay.state import derive_session
from relay.store import ApiKey, IngestRecord, SessionQuery, Store, open_store

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def body(event_id: str, kind: str, session: str, turn: str | None = None, at: int = 0) -> bytes:
    data: dict[str, Any] = {"chatId": session}
    if turn is not None:
        data["turnId"] = turn
    if kind == "agent.chat.turn.completed":
        data["usage"] = {"inputTokens": 10, "outputTokens": 5, "costMicros": 7}
    if kind == "agent.chat.turn.failed":
        data["error"] = {"message": "boom", "code": "E1"}
    occurred = (T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z")
    return orjson.dumps({"id": event_id, "type": kind, "occurred_at": occurred, "data": data})


def rec(raw: bytes, received_at: datetime | None = None) -> IngestRecord:
    received = received_at or datetime.now(UTC)
    return IngestRecord(normalise_casedev("src", orjson.loads(raw), received), raw, received)


def lifecycle(session: str, turns: int) -> list[bytes]:
    """A session that becomes ready and runs turns: completed, failed, one left running."""
    out = [
        body(f"{session}-c", "agent.chat.session.created", session, at=0),
        body(f"{session}-r", "agent.runtime.reused", session, at=1),
        body(f"{session}-w", "agent.worker.ready", session, at=2),
    ]
    for t in range(turns):
        turn = f"turn_{t}"
        out.append(body(f"{session}-{t}s", "agent.chat.turn.started", session, turn, 10 + 3 * t))
        if t == turns - 1:
            continue
        end = "agent.chat.turn.failed" if t % 4 == 3 else "agent.chat.turn.completed"
        out.append(body(f"{session}-{t}e", end, session, turn, 11 + 3 * t))
    return out


@dataclass
class Backend:
    """A store URL, and a way to open stores on it and to run SQL beside them."""

    name: str
    url: str
    alerts: AlertSettings

    def open(self) -> Store:
        return open_store(StoreSettings(url=self.url), None, self.alerts)

    async def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.name == "sqlite":
            with sqlite3.connect(self.url.removeprefix("sqlite:///")) as conn:
                marks = statement.replace("$1", "?").replace("$2", "?")
                return list(conn.execute(marks, args).fetchall())
        conn = await asyncpg.connect(self.url)
        try:
            return [tuple(row) for row in await conn.fetch(statement, *args)]
        finally:
            await conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    alerts = AlertSettings(turn_stall_seconds=60, ready_timeout_seconds=60)
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path}/contract.db", alerts)
    return Backend("postgresql", request.getfixturevalue("pg_url"), alerts)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = backend.open()
    await opened.open()
    yield opened
    await opened.close()


async def test_ingest_and_duplicates(store: Store) -> None:
    """New events get increasing seqs; a repeated (source, id) keeps its first seq."""
    first = [await store.ingest(rec(body(f"e{i}", "agent.worker.ready", "c"))) for i in range(3)]
    assert [r.seq for r in first] == sorted({r.seq for r in first})
    assert not any(r.duplicate for r in first)
    again = await asyncio.gather(
        *(store.ingest(rec(body("e1", "agent.worker.ready", "c"))) for _ in range(10))
    )
    assert {(r.seq, r.duplicate) for r in again} == {(first[1].seq, True)}
    assert [e.id for e in await store.list_events(0, 100)] == ["e0", "e1", "e2"]
    assert await store.last_seq() == first[-1].seq


async def test_events_and_raw_changes_keep_the_bytes_received(store: Store) -> None:
    """An event's payload reads back byte for byte, in the event log, in the session's
    events and in its raw change, however it was laid out."""
    sent = [
        body("e1", "agent.chat.session.created", "chat_a"),
        b'{ "id": "e2",\n  "type": "agent.worker.ready", "data": {"chatId": "chat_a"},'
        b' "occurred_at": "2026-11-22T12:00:01Z", "extra": "\\u00e9" }',
        b'{"id":"e3","type":"agent.runtime.reused","data":{"chatId":"chat_a"},"x":"'
        + b"z" * 3000
        + b'"}',
    ]
    for raw in sent:
        await store.ingest(rec(raw))
    assert [e.payload for e in await store.list_events(0, 10)] == sent
    assert [e.payload for e in await store.list_session_events("chat_a", 0, 10)] == sent
    raw_changes = await store.list_changes(0, 100, ("raw.*",))
    events = [orjson.loads(c.body)["event"] for c in raw_changes]
    assert events == [orjson.loads(raw) for raw in sent]
    one_line = [c.body for c in raw_changes if orjson.loads(c.body)["event"]["id"] == "e1"]
    assert sent[0] in one_line[0]


async def test_derived_state_equals_derive_session(store: Store) -> None:
    """Shuffled lifecycles with repeats give each session the state derive_session gives."""
    sessions = {f"chat_{i}": lifecycle(f"chat_{i}", 2 + i) for i in range(5)}
    raws = [raw for events in sessions.values() for raw in events]
    sent = raws + random.Random(7).sample(raws, len(raws) // 4)
    random.Random(3).shuffle(sent)
    await asyncio.gather(*(store.ingest(rec(raw)) for raw in sent))
    for session_id, events in sessions.items():
        expected = derive_session(rec(raw).event for raw in events)
        assert expected is not None
        row = await store.get_session(session_id)
        assert row is not None
        stored = orjson.loads(row.snapshot)
        want = expected.session.to_dict()
        assert {k: v for k, v in stored.items() if k != "version"} == {
            k: v for k, v in want.items() if k != "version"
        }
        turns = [orjson.loads(s) for _, s in await store.list_turns(session_id, 0, 100)]
        assert {t["turn_id"]: t["status"] for t in turns} == {
            tid: turn.status.value for tid, turn in expected.turns.items()
        }


async def test_changes_come_in_id_order(store: Store) -> None:
    """Change ids run 1, 2, 3... without gaps, and a type filter keeps the order."""
    await asyncio.gather(*(store.ingest(rec(raw)) for raw in lifecycle("chat_a", 4)))
    changes = await store.list_changes(0, 1000, exclude=())
    assert [c.id for c in changes] == list(range(1, len(changes) + 1))
    assert await store.last_change_id() == changes[-1].id
    turns = await store.list_changes(0, 1000, ("turn.*",))
    assert turns
    assert all(c.type.startswith("turn.") for c in turns)
    assert [c.id for c in turns] == sorted(c.id for c in turns)
    raw = [c for c in changes if c.type.startswith("raw.")]
    assert orjson.loads(raw[0].body)["event"]["id"] == "chat_a-c"
    default = await store.list_changes(0, 1000, exclude=("raw.*",))
    assert not any(c.type.startswith("raw.") for c in default)
    assert len(default) + len(raw) == len(changes)


async def test_a_sessions_changes_are_read_alone_in_id_order(store: Store) -> None:
    """`list_session_changes` gives one session's changes, in id order, paged, with the
    excluded types left out, byte for byte as the whole log has them."""
    for raw in lifecycle("chat_a", 2) + lifecycle("chat_b", 2):
        await store.ingest(rec(raw))
    everything = await store.list_changes(0, 1000, exclude=())
    expected = [c for c in everything if c.session_id == "chat_a"]
    first = await store.list_session_changes("chat_a", 0, 3)
    rest = await store.list_session_changes("chat_a", first[-1].id, 1000)
    assert [(c.id, c.body) for c in first + rest] == [(c.id, c.body) for c in expected]
    derived = await store.list_session_changes("chat_a", 0, 1000, ("raw.*",))
    assert [c.id for c in derived] == [c.id for c in expected if not c.type.startswith("raw.")]
    assert derived


async def test_paging(store: Store) -> None:
    """Sessions, turns, events and changes page without gaps or repeats."""
    for i in range(7):
        await store.ingest(rec(body(f"s{i}", "agent.chat.session.created", f"chat_{i}", at=i)))
    for t in range(5):
        await store.ingest(rec(body(f"t{t}", "agent.chat.turn.started", "chat_0", f"turn_{t}")))
    as_of = await store.last_seq()
    await store.ingest(rec(body("late", "agent.worker.ready", "chat_3", at=50)))
    seen: list[str] = []
    after: tuple[int, str] | None = None
    while page := await store.list_sessions(SessionQuery(as_of, after, limit=3)):
        seen += [row.session_id for row in page]
        after = (page[-1].activity_seq, page[-1].session_id)
    assert seen == ["chat_0", "chat_6", "chat_5", "chat_4", "chat_3", "chat_2", "chat_1"]
    turns, cursor = [], 0
    while turn_page := await store.list_turns("chat_0", cursor, 2):
        turns += [orjson.loads(s)["turn_id"] for _, s in turn_page]
        cursor = turn_page[-1][0]
    assert turns == [f"turn_{t}" for t in range(5)]
    events, seq = [], 0
    while event_page := await store.list_events(seq, 4):
        events += [e.id for e in event_page]
        seq = event_page[-1].seq
    assert len(events) == 13
    assert len(set(events)) == 13
    session_events = await store.list_session_events("chat_0", 0, 100)
    assert [e.id for e in session_events] == ["s0", "t0", "t1", "t2", "t3", "t4"]
    ids, change = [], 0
    while change_page := await store.list_changes(change, 5):
        ids += [c.id for c in change_page]
        change = change_page[-1].id
    assert ids == sorted(set(ids))
    assert len(ids) > 13


async def test_filtered_session_pages(store: Store) -> None:
    """Pages filtered by readiness and turn status hold exactly the matching sessions, in
    the unfiltered order, without gaps or repeats."""
    for i in range(9):
        session = f"chat_{i}"
        events = lifecycle(session, 2)[: [1, 3, 4, 5][i % 4]]
        for raw in events:
            await store.ingest(rec(raw))
    as_of = await store.last_seq()
    everything = await store.list_sessions(SessionQuery(as_of, limit=100))
    states = {
        row.session_id: (
            orjson.loads(row.snapshot)["readiness"],
            orjson.loads(row.snapshot)["turn_status"],
        )
        for row in everything
    }
    assert len(set(states.values())) == 3
    for readiness in (None, "provisioning", "ready"):
        for turn_status in (None, "idle", "running"):
            seen: list[str] = []
            after: tuple[int, str] | None = None
            query = SessionQuery(as_of, None, 2, readiness, turn_status)
            while page := await store.list_sessions(replace(query, after=after)):
                seen += [row.session_id for row in page]
                after = (page[-1].activity_seq, page[-1].session_id)
            assert seen == [
                sid
                for sid, (r, t) in states.items()
                if readiness in (None, r) and turn_status in (None, t)
            ], (readiness, turn_status)


async def test_api_keys(store: Store) -> None:
    """Keys are found by hash, listed, and revoked once."""
    key = ApiKey("key_1", "k", ("agent:read", "agent:write"), "2026-11-22T12:00:00.000Z")
    await store.add_api_key(key, "hash1")
    assert await store.find_api_key("hash1") == key
    assert await store.find_api_key("other") is None
    assert await store.revoke_api_key("key_1", "2026-11-22T13:00:00.000Z")
    assert not await store.revoke_api_key("key_1", "2026-11-22T14:00:00.000Z")
    listed = await store.list_api_keys()
    assert [(k.id, k.revoked_at) for k in listed] == [("key_1", "2026-11-22T13:00:00.000Z")]


async def test_alerts_fire_once_and_their_rows_go(store: Store, backend: Backend) -> None:
    """A stalled turn alerts once; an alert row goes when it fires and as soon as it can no
    longer fire (the session is ready, the turn ended), and later events of the session do
    not bring a fired alert back."""
    long_ago = datetime.now(UTC) - timedelta(seconds=600)
    await store.ingest(rec(body("c", "agent.chat.session.created", "chat_s"), long_ago))
    assert await backend.sql("SELECT kind FROM alerts") == [("session.ready_timeout",)]
    await store.ingest(rec(body("w", "agent.worker.ready", "chat_s", at=1), long_ago))
    assert await backend.sql("SELECT kind FROM alerts") == []  # ready: it can no longer fire
    await store.ingest(rec(body("t1", "agent.chat.turn.started", "chat_s", "turn_1"), long_ago))
    await store.ingest(rec(body("t2", "agent.chat.turn.started", "chat_s", "turn_2"), long_ago))
    rows = await backend.sql("SELECT turn_id, kind FROM alerts ORDER BY turn_id")
    assert rows == [("turn_1", "turn.stalled"), ("turn_2", "turn.stalled")]
    await store.ingest(rec(body("t2e", "agent.chat.turn.completed", "chat_s", "turn_2", 5)))
    assert await backend.sql("SELECT turn_id FROM alerts") == [("turn_1",)]
    now = datetime.now(UTC).timestamp()
    assert await store.fire_due_alerts(now) == 1
    assert await store.fire_due_alerts(now + 1) == 0
    assert await backend.sql("SELECT turn_id FROM alerts") == []
    await store.ingest(rec(body("t3", "agent.chat.turn.started", "chat_s", "turn_3", 9)))
    assert await backend.sql("SELECT turn_id FROM alerts") == [("turn_3",)]
    stalled = await store.list_changes(0, 100, ("turn.stalled",))
    assert [(c.session_id, c.turn_id) for c in stalled] == [("chat_s", "turn_1")]
    fired = orjson.loads(stalled[0].body)
    assert fired["turn"]["status"] == "running"
    assert fired["session"]["readiness"] == "ready"
    reopened = backend.open()
    await reopened.open()
    try:  # a store with an empty cache reads the fired mark from the session's facts
        await reopened.ingest(rec(body("t4", "agent.chat.turn.started", "chat_s", "turn_4", 9)))
        assert await reopened.fire_due_alerts(datetime.now(UTC).timestamp() + 3600) == 2
        stalled = await reopened.list_changes(0, 100, ("turn.stalled",))
        assert [c.turn_id for c in stalled] == ["turn_1", "turn_3", "turn_4"]
    finally:
        await reopened.close()


async def test_facts_are_loaded_without_replaying_events(store: Store, backend: Backend) -> None:
    """A store with an empty cache derives the next event from the stored facts: with the
    session's events deleted, the state still counts every turn."""
    events = lifecycle("chat_f", 6)
    for raw in events:
        await store.ingest(rec(raw))
    await store.close()
    await backend.sql("DELETE FROM events WHERE session_id = $1", "chat_f")
    reopened = backend.open()
    await reopened.open()
    try:
        last = body("chat_f-5e", "agent.chat.turn.completed", "chat_f", "turn_5", 40)
        await reopened.ingest(rec(last))
        expected = derive_session(rec(raw).event for raw in [*events, last])
        assert expected is not None
        row = await reopened.get_session("chat_f")
        assert row is not None
        assert orjson.loads(row.snapshot) == expected.session.to_dict()
        assert orjson.loads(row.snapshot)["counts"]["turns"] == 6
        turns = {
            orjson.loads(s)["turn_id"]: orjson.loads(s)
            for _, s in await reopened.list_turns("chat_f", 0, 100)
        }
        assert turns == {tid: t.to_dict() for tid, t in expected.turns.items()}
        await backend.sql("DELETE FROM events WHERE session_id = $1", "chat_f")
        await backend.sql("DELETE FROM changes WHERE session_id = $1", "chat_f")
        problems = await reopened.check_derived_state()  # no event derives it now
        assert "session chat_f is stored but no event derives it" in problems
    finally:
        await reopened.close()


async def test_follows_are_leased_to_one_instance_at_a_time(store: Store) -> None:
    """A follow's lease goes to one owner until it ends; only the owner moves its position;
    a stopped follow starts again from its position; a release frees it at once."""
    started = await store.start_follow("casedev", "chat_f", "2026-12-01T00:00:00Z")
    assert (started.state, started.position) == ("following", None)
    assert [f.session_id for f in await store.claim_follows("a", 100.0, 115.0, 10)] == ["chat_f"]
    assert await store.claim_follows("b", 101.0, 116.0, 10) == []
    assert not await store.update_follow("b", "casedev", "chat_f", {"position": "9"}, "t")
    assert await store.update_follow("a", "casedev", "chat_f", {"position": "7"}, "t")
    taken = await store.claim_follows("b", 120.0, 135.0, 10)  # a's lease ended at 115
    assert [(f.owner, f.position) for f in taken] == [("b", "7")]
    assert await store.update_follow("b", "casedev", "chat_f", {"state": "idle"}, "t")
    assert await store.claim_follows("b", 121.0, 136.0, 10) == []  # stopped: not claimable
    again = await store.start_follow("casedev", "chat_f", "t2")
    assert (again.state, again.position) == ("following", "7")
    await store.release_follows("b")
    assert [f.owner for f in await store.claim_follows("c", 122.0, 137.0, 10)] == ["c"]
    assert [f.session_id for f in await store.list_follows("casedev")] == ["chat_f"]
