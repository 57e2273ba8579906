"""SQLite reads are served from indexes and a pool of connections."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from relay.changes import RAW_EVENT_COLUMNS, sql_glob
from relay.config import StoreSettings
from relay.events import Event
from relay.store import IngestRecord, SessionQuery, open_store
from relay.store.sqlite import _SESSION_PAGE, SQLiteStore
from relay.store.sqlite_reads import changes_query

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
    """Changes of exact type names are read through `changes_by_type`, merged in id order."""
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
