"""SQLite reads are served from indexes and a pool of connections."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relay.changes import RAW_EVENT_COLUMNS, glob_pattern, sql_glob
from relay.config import StoreSettings
from relay.events import Event
from relay.store import IngestRecord, SessionQuery, open_store
from relay.store.sqlite import _SESSION_PAGE, SQLiteStore
from relay.store.sqlite_reads import changes_query, session_changes_query

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def record(number: int, kind: str, session: str, turn: str | None = None) -> IngestRecord:
    event = Event(
        source="s",
        id=f"evt_{number}",
        type=kind,
        occurred_at=T0 + timedelta(seconds=number),
        session_id=session,
        turn_id=turn,
    )
    body = b'{"id": "evt_%d", "type": "%s", "data": {"chatId": "%s"}}' % (
        number,
        kind.encode(),
        session.encode(),
    )
    return IngestRecord(event, body, T0)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    backend = open_store(StoreSettings(url=f"sqlite:///{tmp_path}/reads.db", writer="thread"))
    assert isinstance(backend, SQLiteStore)
    await backend.open()
    yield backend
    await backend.close()


def plan(path: Path, sql: str, params: Any) -> str:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
    return "\n".join(str(row[-1]) for row in rows)


async def test_session_page_reads_the_activity_index(store: SQLiteStore, tmp_path: Path) -> None:
    """A page of sessions walks the activity index; no table scan orders all sessions."""
    await store.ingest_many([record(n, "agent.chat.session.created", f"c{n}") for n in range(5)])
    params = {
        "as_of": 3,
        "top": 3,
        "readiness": None,
        "turn_status": None,
        "after_act": -1,
        "after_id": "",
        "limit": 2,
    }
    text = plan(tmp_path / "reads.db", _SESSION_PAGE, params)
    assert "sessions_by_activity" in text
    assert not [line for line in text.splitlines() if line.startswith(("SCAN s", "SCAN e"))]
    rows = await store.list_sessions(SessionQuery(3, None, 2))
    assert [row.session_id for row in rows] == ["c2", "c1"]
    rows = await store.list_sessions(SessionQuery(3, (rows[-1].activity_seq, "c1"), 2))
    assert [row.session_id for row in rows] == ["c0"]


async def test_session_page_places_sessions_that_moved_where_they_were(
    store: SQLiteStore,
) -> None:
    """A session with activity after the page's `as_of` is listed by its activity then."""
    await store.ingest_many([record(n, "agent.chat.session.created", f"c{n}") for n in range(4)])
    await store.ingest(record(10, "agent.worker.ready", "c0"))
    rows = await store.list_sessions(SessionQuery(4, None, 10))
    assert [row.session_id for row in rows] == ["c3", "c2", "c1", "c0"]
    assert rows[-1].activity_seq == 1


async def test_changes_of_exact_types_use_the_type_index(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """Changes of exact type names, and of the types globs match, are read through
    `changes_by_type` and merged in id order."""
    records = [record(n, "agent.chat.session.created", f"c{n}") for n in range(6)]
    records += [record(10 + n, "agent.worker.ready", f"c{n}") for n in range(0, 6, 2)]
    await store.ingest_many(records)
    sql, params = changes_query(
        RAW_EVENT_COLUMNS, 0, 2, ("session.ready", "nothing.ever"), (), sql_glob
    )
    text = plan(tmp_path / "reads.db", sql, params)
    assert "changes_by_type" in text
    exact = await store.list_changes(0, 100, ("session.ready", "session.created"))
    by_glob = await store.list_changes(0, 100, ("session.read?", "session.create?"))
    assert [c.id for c in exact] == [c.id for c in by_glob]
    assert [c.type for c in exact].count("session.ready") == 3
    first_two = await store.list_changes(0, 2, ("session.ready", "session.created"))
    assert [c.id for c in first_two] == [c.id for c in exact[:2]]
    assert await store.list_changes(0, 10, ("nothing.ever",)) == []
    everything = await store.list_changes(0, 1000, ("*",))
    assert [c.id for c in exact] == [
        c.id for c in everything if c.type in ("session.ready", "session.created")
    ]
    for globs in (("raw.*",), ("session.*", "raw.agent.w*"), ("nothing.*",), ("*",)):
        pattern = glob_pattern(globs)
        want = [c.id for c in everything if pattern.fullmatch(c.type)]
        assert [c.id for c in await store.list_changes(0, 1000, globs)] == want
        assert [c.id for c in await store.list_changes(2, 3, globs)] == [i for i in want if i > 2][
            :3
        ]


async def test_a_slow_read_does_not_hold_up_others(store: SQLiteStore) -> None:
    """A key lookup is answered while a slow page is still being read."""
    slow = asyncio.create_task(
        store._read(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30000000)"
            " SELECT count(*) FROM n",
            (),
        )
    )
    await asyncio.sleep(0)
    assert await store.find_api_key("no such hash") is None
    assert await store.get_session("nobody") is None
    assert not slow.done()
    assert (await slow)[0][0] == 30_000_000


async def test_session_changes_are_read_through_the_sessions_events(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """One session's changes, alerts included, are what filtering the whole log gives,
    paged in id order, read through indexes that do not visit other sessions."""
    records = []
    for n in range(12):
        session = f"c{n % 3}"
        records.append(record(n, "agent.chat.session.created", session))
        records.append(record(100 + n, "agent.chat.turn.started", session, f"t{n}"))
    await store.ingest_many(records[:10])
    await store.ingest_many(records[10:])
    fired, deadline = 0, time.monotonic() + 10
    while not fired and time.monotonic() < deadline:  # once the batch is all written
        fired = await store.fire_due_alerts(T0.timestamp() + 10**9)
        await asyncio.sleep(0.01)
    assert fired > 0
    await store.ingest(record(500, "agent.chat.turn.completed", "c1", "t1"))
    everything = await store.list_changes(0, 10_000)
    for session in ("c0", "c1", "c2"):
        want = [c for c in everything if c.session_id == session]
        assert any(c.type == "turn.stalled" for c in want)
        for after in (0, want[3].id, want[-1].id):
            got, page_after = [], after
            while page := await store.list_session_changes(session, page_after, 4):
                got += page
                page_after = page[-1].id
            assert got == [c for c in want if c.id > after]
    no_raw = await store.list_session_changes("c1", 0, 100, ("raw.*",))
    assert no_raw == [c for c in everything if c.session_id == "c1" and c.type[:4] != "raw."]
    sql, params = session_changes_query(RAW_EVENT_COLUMNS, "c1", 5, 4, (), sql_glob)
    text = plan(tmp_path / "reads.db", sql, params)
    assert "events_by_session" in text
    assert "alert_changes_by_session" in text
    assert not [line for line in text.splitlines() if line.startswith(("SCAN c", "SCAN e"))]
