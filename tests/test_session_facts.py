"""Session facts: their compact encoding, and an embedded store written before they
were stored (migration 0009), whose sessions are rebuilt once and keep their alerts."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from relay.config import AlertSettings, StoreSettings
from relay.state import derive_session
from relay.store import open_store
from relay.store.facts import decode_record, encode_session, encode_turn
from relay.store.sqlite import migrations
from tests.test_store_contract import body, lifecycle, rec


def test_facts_round_trip() -> None:
    """A record encoded as session and turn facts decodes to an equal record."""
    events = [rec(raw).event for raw in lifecycle("chat_x", 5)]
    record = derive_session(events)
    assert record is not None
    turns = [(turn_id, encode_turn(record, turn_id)) for turn_id in record.facts.turns]
    decoded = decode_record("chat_x", encode_session(record), turns)
    assert decoded.facts == record.facts
    assert decoded.session.to_dict() == record.session.to_dict()
    assert {t: s.to_dict() for t, s in decoded.turns.items()} == {
        t: s.to_dict() for t, s in record.turns.items()
    }


def _store_before_facts(path: Path) -> None:
    """A store at migration 8: a session with a fired and a pending stall alert."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)"
        )
        for version, sql in migrations():
            if version > 8:
                break
            for statement in sql.split(";\n"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, 'then')", (version,))
        raws = [
            body("o1", "agent.chat.session.created", "chat_old", at=0),
            body("o2", "agent.chat.turn.started", "chat_old", "turn_1", at=1),
            body("o3", "agent.chat.turn.started", "chat_old", "turn_2", at=2),
        ]
        for seq, raw in enumerate(raws, 1):
            event = rec(raw).event
            conn.execute(
                "INSERT INTO events VALUES (?, 'src', ?, ?, 'chat_old', ?, ?, ?, ?)",
                (seq, event.id, event.type, event.turn_id, "t", "2026-11-22T12:00:00.000Z", raw),
            )
        past = datetime.now(UTC).timestamp() - 100
        conn.executemany(
            "INSERT INTO alerts (kind, session_id, turn_id, due_at, fired_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                ("turn.stalled", "chat_old", "turn_1", past, past),
                ("turn.stalled", "chat_old", "turn_2", past, None),
                ("session.ready_timeout", "chat_old", "", past + 10_000, None),
            ],
        )


async def test_a_session_stored_before_facts_is_rebuilt_once_and_keeps_its_alerts(
    tmp_path: Path,
) -> None:
    """After migration 0009 an old session is replayed on its next event, then has facts;
    its fired alert stays fired and its pending one fires once."""
    path = tmp_path / "old.db"
    _store_before_facts(path)
    settings = StoreSettings(url=f"sqlite:///{path}", writer="thread")
    alerts = AlertSettings(turn_stall_seconds=60, ready_timeout_seconds=60)
    store = open_store(settings, None, alerts)
    await store.open()
    try:
        await store.ingest(rec(body("o4", "agent.chat.turn.started", "chat_old", "turn_3", 3)))
        assert await store.fire_due_alerts(datetime.now(UTC).timestamp()) == 1
        stalled = await store.list_changes(0, 100, ("turn.stalled",))
        assert [c.turn_id for c in stalled] == ["turn_2"]
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        facts = conn.execute("SELECT facts, fired FROM session_facts").fetchall()
        assert len(facts) == 1
        assert facts[0][0] is not None
        assert sorted(orjson.loads(facts[0][1])) == [
            ["turn.stalled", "turn_1"],
            ["turn.stalled", "turn_2"],
        ]
        assert conn.execute("SELECT count(*) FROM turns WHERE facts IS NULL").fetchone() == (0,)
        pending = conn.execute("SELECT kind, turn_id FROM alerts ORDER BY kind").fetchall()
        assert pending == [("session.ready_timeout", ""), ("turn.stalled", "turn_3")]
        conn.execute("DELETE FROM events")  # from now on the facts alone carry the session
    store = open_store(settings, None, alerts)
    await store.open()
    try:
        later = datetime.now(UTC) + timedelta(seconds=1)
        done = body("o5", "agent.chat.turn.completed", "chat_old", "turn_1", 4)
        await store.ingest(rec(done, later))
        row = await store.get_session("chat_old")
        assert row is not None
        counts = orjson.loads(row.snapshot)["counts"]
        assert (counts["turns"], counts["completed"]) == (3, 1)
    finally:
        await store.close()
