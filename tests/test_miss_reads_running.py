"""A session read back after leaving the writer's cache costs what its running turns
cost, not what all its turns do, and derives the same state as one never evicted."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import StoreSettings
from relay.events import Event, EventType, Usage
from relay.normalize import decoder
from relay.packed_bodies import unpack
from relay.store import IngestRecord, open_store
from relay.store.derive import derive_batch, entry_of
from relay.store.facts import encode_session
from relay.store.sqlite_writer import BatchWriter
from tests.test_deadline_work import THRESHOLDS
from tests.test_state import lifecycles
from tests.test_state_cost import allocated, session_of, turn_event

RECEIVED = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def ingest(event: Event) -> IngestRecord:
    return IngestRecord(event, b'{"id": "%s"}' % event.id.encode(), RECEIVED)


def open_writer(path: Path) -> tuple[sqlite3.Connection, BatchWriter]:
    async def create() -> None:
        store = open_store(StoreSettings(url=f"sqlite:///{path}"), {"src": "casedev"})
        await store.open()
        await store.close()

    asyncio.run(create())
    conn = sqlite3.connect(path, isolation_level=None)
    return conn, BatchWriter(conn, decoder({"src": "casedev"}), 600.0, 120.0)


def stored_state(conn: sqlite3.Connection) -> dict[str, Any]:
    """Every session's and turn's stored snapshot, the changes' bodies and alert rows."""
    sessions = conn.execute("SELECT session_id, snapshot FROM sessions").fetchall()
    turns = conn.execute("SELECT session_id, turn_id, snapshot FROM turns").fetchall()
    changes = conn.execute("SELECT type, session_id, turn_id, body FROM changes ORDER BY id")
    return {
        "sessions": {sid: orjson.loads(unpack(s)) for sid, s in sessions},
        "turns": {(sid, t): orjson.loads(unpack(s)) for sid, t, s in turns},
        "changes": [row[:3] for row in changes],
        "alerts": sorted(conn.execute("SELECT session_id, turn_id, kind FROM alerts")),
    }


def long_session(running: int, completed: int) -> list[Event]:
    events = [turn_event(EventType.WORKER_READY, 0, "")]
    for n in range(completed):
        usage = Usage(1, 2, 0, 3, 5)
        events.append(turn_event(EventType.TURN_STARTED, n, f"done_{n:05d}"))
        done = turn_event(EventType.TURN_COMPLETED, n, f"done_{n:05d}")
        events.append(replace(done, usage=usage))
    for n in range(running):
        events.append(turn_event(EventType.TURN_STARTED, 5_000 + n, f"stuck_{n:05d}"))
    return events


def write_all(writer: BatchWriter, events: list[Event]) -> None:
    for start in range(0, len(events), 500):
        writer.write([ingest(event) for event in events[start : start + 500]])


@settings(max_examples=60, deadline=None)
@given(events=lifecycles(), size=st.integers(1, 4))
def test_an_evicted_session_derives_what_a_cached_one_does(events: list[Event], size: int) -> None:
    """Writing batches with the cache emptied before each stores what a warm writer does."""
    with tempfile.TemporaryDirectory() as work:
        warm_conn, warm = open_writer(Path(work) / "warm.db")
        cold_conn, cold = open_writer(Path(work) / "cold.db")
        for start in range(0, len(events), size):
            batch = [ingest(event) for event in events[start : start + size]]
            warm.write(batch)
            cold.cache.clear()
            cold.write(batch)
        assert stored_state(cold_conn) == stored_state(warm_conn)
        warm_conn.close()
        cold_conn.close()


def test_a_miss_decodes_neither_completed_nor_running_turns(tmp_path: Path) -> None:
    """A miss on a session of 2,000 completed and 2,000 running turns decodes its last one."""
    conn, writer = open_writer(tmp_path / "relay.db")
    write_all(writer, long_session(running=2_000, completed=2_000))
    writer.cache.clear()
    before = writer.turn_rows_read
    writer.write([ingest(turn_event(EventType.TURN_STARTED, 9_000, "new_one"))])
    assert writer.turn_rows_read - before == 1  # the last turn, a running one
    (snapshot,) = conn.execute(
        "SELECT snapshot FROM sessions WHERE session_id = 'chat_big'"
    ).fetchone()
    session = orjson.loads(unpack(snapshot))
    assert session["counts"] == {"turns": 4_001, "completed": 2_000, "failed": 0, "conflicts": 0}
    assert session["active_turn_id"] == "new_one"
    assert session["usage"]["total_tokens"] == 6_000
    writer.cache.clear()
    writer.write([ingest(turn_event(EventType.TURN_COMPLETED, 9_001, "new_one"))])
    (snapshot,) = conn.execute(
        "SELECT snapshot FROM sessions WHERE session_id = 'chat_big'"
    ).fetchone()
    assert orjson.loads(unpack(snapshot))["active_turn_id"] == "stuck_01999"
    conn.close()


def test_an_alert_of_an_evicted_session_shows_its_turn(tmp_path: Path) -> None:
    """A stall alert firing after its session left the cache carries the turn's snapshot."""
    conn, writer = open_writer(tmp_path / "relay.db")
    write_all(writer, long_session(running=50, completed=50))
    writer.cache.clear()
    before = writer.turn_rows_read
    commit = writer.fire_due_alerts(RECEIVED.timestamp() + 601)
    stalled = [c for c in commit.changes if c.type == "turn.stalled"]
    assert len(stalled) == 50
    assert all(orjson.loads(c.body)["turn"]["turn_id"] == c.turn_id for c in stalled)
    assert writer.turn_rows_read - before <= 51  # each stalled turn once, the last one
    assert conn.execute("SELECT count(*) FROM alerts").fetchone() == (0,)
    conn.close()


def test_a_late_event_reads_its_completed_turn(tmp_path: Path) -> None:
    """A late failure of a turn completed long ago reads that one turn and moves the counts."""
    conn, writer = open_writer(tmp_path / "relay.db")
    write_all(writer, long_session(running=1, completed=2_000))
    writer.cache.clear()
    writer.write([ingest(turn_event(EventType.TURN_STARTED, 9_000, "new_one"))])
    before = writer.turn_rows_read
    late = turn_event(EventType.TURN_FAILED, 7, "done_00007")  # ties with completed: fails
    writer.write([ingest(late)])
    assert writer.turn_rows_read - before == 1
    (turn,) = conn.execute(
        "SELECT snapshot FROM turns WHERE session_id = 'chat_big' AND turn_id = 'done_00007'"
    ).fetchone()
    assert orjson.loads(unpack(turn))["status"] == "failed"
    (snapshot,) = conn.execute(
        "SELECT snapshot FROM sessions WHERE session_id = 'chat_big'"
    ).fetchone()
    counts = orjson.loads(unpack(snapshot))["counts"]
    assert counts == {"turns": 2_002, "completed": 1_999, "failed": 1, "conflicts": 0}
    conn.close()


def batch_bytes(running: int) -> int:
    """Bytes of session facts, snapshots and turn rows one new turn's start writes."""
    entry = entry_of(session_of(running=running, completed=0), 1, (), THRESHOLDS)
    event = turn_event(EventType.TURN_STARTED, 95_000, "one_more")
    derived = derive_batch([ingest(event)], {}, 10_000, lambda sid: entry, THRESHOLDS)
    rows = [*derived.facts, *derived.sessions, *derived.turns]
    return sum(len(v) for row in rows for v in row if isinstance(v, bytes | str))


def test_a_batch_writes_as_many_bytes_with_many_running_turns() -> None:
    """A batch's rows are as large with 2,000 running turns as with 2."""
    few, many = batch_bytes(2), batch_bytes(2_000)
    assert many <= few + 64, (few, many)
    assert len(encode_session(session_of(running=2_000, completed=0))) < 1_000


def batch_memory(running: int) -> int:
    """Most memory held at once deriving one new turn's start and its alert row."""
    entry = entry_of(session_of(running=running, completed=0), 1, (), THRESHOLDS)
    event = turn_event(EventType.TURN_STARTED, 95_000, "one_more")
    return allocated(
        lambda: derive_batch([ingest(event)], {}, 10_000, lambda sid: entry, THRESHOLDS)
    )


def test_a_batch_allocates_as_much_with_many_running_turns() -> None:
    """A batch beside 2,000 running turns (and their alert rows) copies none of them."""
    few, many = batch_memory(2), batch_memory(2_000)
    assert many < few + 8_000, (few, many)
