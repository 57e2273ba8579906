"""A session read back after leaving a PostgreSQL store's cache costs its last turn and
the turns of the events that come, not all of its turns."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson

from relay.config import AlertSettings, StoreSettings
from relay.events import EventType
from relay.packed_bodies import unpack
from relay.store.postgres import PostgresStore
from relay.store.postgres_writer import SERVER_SETTINGS, PostgresBatchWriter
from tests.test_miss_reads_running import ingest, long_session
from tests.test_state_cost import turn_event


def evict_all(store: PostgresStore) -> None:
    """Empty the cache of a store whose writer runs on its loop."""
    writer = store._writer
    assert isinstance(writer, PostgresBatchWriter)
    writer._cache.clear()


async def session_snapshot(url: str) -> dict[str, object]:
    conn = await asyncpg.connect(url)
    try:
        snapshot = await conn.fetchval(
            "SELECT snapshot FROM sessions WHERE session_id = 'chat_big'"
        )
    finally:
        await conn.close()
    found: dict[str, object] = orjson.loads(unpack(snapshot))
    return found


async def test_a_miss_reads_the_last_turn_and_those_of_its_events(pg_url: str) -> None:
    """A miss on 1,000 completed and 1,000 running turns reads one turn row per turn used."""
    store = PostgresStore(StoreSettings(url=pg_url, writer="thread"), {"src": "casedev"}, _alerts())
    await store.open()
    try:
        events = long_session(running=1_000, completed=1_000)
        for start in range(0, len(events), 500):
            await store.ingest_many([ingest(e) for e in events[start : start + 500]])
        evict_all(store)
        before = store.turn_rows_read
        await store.ingest(ingest(turn_event(EventType.TURN_STARTED, 9_000, "new_one")))
        assert store.turn_rows_read - before == 1  # the last turn, a running one
        session = await session_snapshot(pg_url)
        assert session["counts"] == {
            "turns": 2_001,
            "completed": 1_000,
            "failed": 0,
            "conflicts": 0,
        }
        assert session["active_turn_id"] == "new_one"
        evict_all(store)
        before = store.turn_rows_read
        late = turn_event(EventType.TURN_FAILED, 7, "done_00007")  # ties with completed: fails
        await store.ingest(ingest(late))
        assert store.turn_rows_read - before == 2  # the last turn, then the late one's
        session = await session_snapshot(pg_url)
        assert session["counts"] == {"turns": 2_001, "completed": 999, "failed": 1, "conflicts": 0}
        evict_all(store)
        await store.ingest(ingest(turn_event(EventType.TURN_COMPLETED, 9_001, "new_one")))
        assert (await session_snapshot(pg_url))["active_turn_id"] == "stuck_00999"
    finally:
        await store.close()


def _alerts() -> AlertSettings:

    return AlertSettings()


async def stored_state(url: str) -> dict[str, object]:
    """Every session's and turn's snapshot, the changes' keys and the alert rows."""
    conn = await asyncpg.connect(url)
    try:
        sessions = await conn.fetch("SELECT session_id, snapshot FROM sessions")
        turns = await conn.fetch("SELECT session_id, turn_id, snapshot FROM turns")
        changes = await conn.fetch("SELECT type, session_id, turn_id FROM changes ORDER BY id")
        alerts = await conn.fetch("SELECT session_id, turn_id, kind FROM alerts")
    finally:
        await conn.close()
    return {
        "sessions": {sid: orjson.loads(unpack(s)) for sid, s in sessions},
        "turns": {(sid, t): orjson.loads(unpack(s)) for sid, t, s in turns},
        "changes": [tuple(row) for row in changes],
        "alerts": sorted(tuple(row) for row in alerts),
    }


async def test_an_evicted_session_derives_what_a_cached_one_does(pg_url: str) -> None:
    """Batches written with the cache emptied before each store what a warm store does."""
    events = long_session(running=20, completed=20)
    events += [
        turn_event(EventType.TURN_FAILED, 7_000, "done_00003"),
        turn_event(EventType.TURN_COMPLETED, 7_001, "stuck_00005"),
        turn_event(EventType.TURN_STARTED, 7_002, "late_one"),
        turn_event(EventType.TURN_COMPLETED, 7_003, "stuck_00019"),
        turn_event(EventType.TURN_FAILED, 7_004, "late_one"),
    ]
    warm = PostgresStore(StoreSettings(url=pg_url, writer="thread"), {"src": "casedev"}, _alerts())
    await warm.open()
    try:
        for start in range(0, len(events), 3):
            await warm.ingest_many([ingest(e) for e in events[start : start + 3]])
        expected = await stored_state(pg_url)
    finally:
        await warm.close()
    await _empty(pg_url)
    cold = PostgresStore(StoreSettings(url=pg_url, writer="thread"), {"src": "casedev"}, _alerts())
    await cold.open()
    try:
        for start in range(0, len(events), 3):
            evict_all(cold)
            await cold.ingest_many([ingest(e) for e in events[start : start + 3]])
        assert await stored_state(pg_url) == expected
    finally:
        await cold.close()


class _PausedWrite:
    """A connection whose batch write (its one `fetchval`) waits until `go` is set; it
    sets `reached` first. Everything else goes to the connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self.reached = asyncio.Event()
        self.go = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetchval(self, *args: Any) -> Any:
        self.reached.set()
        await self.go.wait()
        return await self._conn.fetchval(*args)


async def test_a_session_changed_while_its_lock_waits_is_read_again(pg_url: str) -> None:
    """Writer A has a session cached; writer B (another instance) changes it and, while
    B still holds it, A's batch for it starts and waits for the lock. A's statement read
    the session's turns and alert rows before B committed, so A reads them again on their
    own, and it and its cache then store what one writer taking the batches in turn
    stores."""
    ready, started, completed = (
        EventType.WORKER_READY,
        EventType.TURN_STARTED,
        EventType.TURN_COMPLETED,
    )
    batches = [
        [turn_event(ready, 0, ""), turn_event(started, 1, "t1")],
        [turn_event(completed, 2, "t1")],  # the last turn stays t1: read with the lock
        [turn_event(started, 3, "t2")],
        [turn_event(completed, 4, "t2")],  # from A's cache: t1 must not be running in it
    ]
    settings = StoreSettings(url=pg_url, writer="thread")
    one = PostgresStore(settings, {"src": "casedev"}, _alerts())
    await one.open()
    try:
        for batch in batches:
            await one.ingest_many([ingest(e) for e in batch])
        expected = await stored_state(pg_url)
    finally:
        await one.close()
    await _empty(pg_url)

    store = PostgresStore(settings, {"src": "casedev"}, _alerts())
    await store.open()
    other = _PausedWrite(await asyncpg.connect(pg_url, server_settings=SERVER_SETTINGS))
    watch = await asyncpg.connect(pg_url)

    @contextlib.asynccontextmanager
    async def acquire() -> AsyncIterator[Any]:
        yield other

    try:
        a = store._writer
        assert isinstance(a, PostgresBatchWriter)
        b = PostgresBatchWriter(acquire, a._thresholds, 1 << 20)
        await store.ingest_many([ingest(e) for e in batches[0]])  # A caches the session
        b_writes = asyncio.create_task(b.write([ingest(e) for e in batches[1]]))
        await asyncio.wait_for(other.reached.wait(), 10)  # B holds the session's row
        a_writes = asyncio.create_task(store.ingest_many([ingest(e) for e in batches[2]]))
        deadline = time.monotonic() + 10
        while not await watch.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):
            assert time.monotonic() < deadline, "A's batch never waited for the session"
            await asyncio.sleep(0.01)
        other.go.set()
        await asyncio.wait_for(b_writes, 10)
        await asyncio.wait_for(a_writes, 10)
        assert a.sessions_read_again == 1
        await store.ingest_many([ingest(e) for e in batches[3]])
        assert await stored_state(pg_url) == expected
    finally:
        await watch.close()
        await other.close()
        await store.close()


async def _empty(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE events, changes, sessions, turns, session_facts, alerts")
        await conn.execute("UPDATE counters SET value = 0")
        await conn.execute("ALTER TABLE turns ALTER COLUMN position RESTART")
    finally:
        await conn.close()
