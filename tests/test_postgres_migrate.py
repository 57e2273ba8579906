"""The PostgreSQL migration runner: versions with gaps, a version that comes late, and
upgrades of databases made before alert formats and before packed snapshots."""

from __future__ import annotations

import asyncpg
import orjson

from relay.config import AlertSettings, StoreSettings
from relay.packed_bodies import unpack
from relay.store import SessionQuery
from relay.store.postgres import PostgresStore
from relay.store.postgres_migrate import migrate_connection, postgres_migrations
from relay.webhooks.formats import Format
from relay.webhooks.store import open_delivery_store
from tests.test_store_contract import body, lifecycle, rec


async def test_the_packaged_migrations_apply_with_a_gap_in_their_versions(pg_url: str) -> None:
    """Every packaged migration is applied once, whether or not the versions are contiguous."""
    versions = [version for version, _ in postgres_migrations()]
    conn = await asyncpg.connect(pg_url)
    try:
        assert await migrate_connection(conn) == versions
        assert await migrate_connection(conn) == []
        assert await conn.fetchval("SELECT count(*) FROM alert_incidents") == 0
    finally:
        await conn.close()


async def test_a_version_below_one_applied_is_applied_by_the_next_run(pg_url: str) -> None:
    """A migration numbered below one already applied is applied when it appears."""
    first = [(1, "CREATE TABLE a (x INTEGER)"), (3, "CREATE TABLE c (x INTEGER)")]
    conn = await asyncpg.connect(pg_url)
    try:
        assert await migrate_connection(conn, first) == [1, 3]
        later = [*first, (2, "CREATE TABLE b (x INTEGER)"), (4, "CREATE TABLE d (x INTEGER)")]
        assert await migrate_connection(conn, later) == [2, 4]
        assert await migrate_connection(conn, later) == []
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE tablename IN ('a', 'b', 'c', 'd')"
        )
        assert sorted(row[0] for row in tables) == ["a", "b", "c", "d"]
    finally:
        await conn.close()


async def test_subscriptions_made_before_alert_formats_are_standard_ones(pg_url: str) -> None:
    """After the alert formats' migration, an older subscription is a standard one with no
    routing key and no headers."""
    conn = await asyncpg.connect(pg_url)
    try:
        older = [(v, sql) for v, sql in postgres_migrations() if v < 4]
        upto_formats = [(v, sql) for v, sql in postgres_migrations() if v <= 4]
        await migrate_connection(conn, older)
        await conn.execute(
            "INSERT INTO subscriptions (id, url, types, session_ids, ordering, max_in_flight,"
            " enabled, secret, start_after, created_at, updated_at) VALUES ('sub_old',"
            " 'https://example.com/', '[]', '[]', 'none', 10, true, '\\x00'::bytea, 0, 't', 't')"
        )
        assert await migrate_connection(conn, upto_formats) == [4]
    finally:
        await conn.close()
    store = open_delivery_store(StoreSettings(url=pg_url))
    await store.open()
    try:
        found = await store.get_subscription("sub_old")
    finally:
        await store.close()
    assert found is not None
    assert (found.format, found.routing_key, found.headers) == (Format.STANDARD, None, ())


async def test_a_store_from_before_packed_snapshots_reads_the_same_after_upgrading(
    pg_url: str,
) -> None:
    """Snapshots and payloads stored as JSON and a log indexed by session (before
    migration 7) read as they did once the store is upgraded, and the next ingest packs
    what it writes."""
    store = PostgresStore(StoreSettings(url=pg_url), {}, AlertSettings())
    await store.open()
    try:
        for raw in lifecycle("chat_a", 3) + lifecycle("chat_b", 2):
            await store.ingest(rec(raw))
        before = await _reads(store)
    finally:
        await store.close()
    conn = await asyncpg.connect(pg_url)
    try:  # the store as version 6 left it
        for table, key in (("sessions", "session_id"), ("turns", "session_id, turn_id")):
            rows = await conn.fetch(f"SELECT {key}, snapshot FROM {table}")
            assert all(row["snapshot"][:1] == b"\x01" for row in rows)
            columns = key.split(", ")
            where = " AND ".join(f"{c} = ${n}" for n, c in enumerate(columns, 2))
            for row in rows:
                json = unpack(row["snapshot"])
                await conn.execute(
                    f"UPDATE {table} SET snapshot = $1 WHERE {where}", json, *row[:-1]
                )
        for seq, payload in await conn.fetch("SELECT seq, payload FROM events"):
            assert payload[:1] == b"\x03"
            await conn.execute(
                "UPDATE events SET payload = $1 WHERE seq = $2", unpack(payload), seq
            )
        await conn.execute(
            "DROP INDEX sessions_by_status; DROP INDEX alert_changes_by_session;"
            " CREATE INDEX changes_by_session ON changes (session_id, id);"
            " DELETE FROM schema_migrations WHERE version = 7"
        )
        assert await migrate_connection(conn) == [7]
    finally:
        await conn.close()
    store = PostgresStore(StoreSettings(url=pg_url), {}, AlertSettings())
    await store.open()
    try:
        assert await _reads(store) == before
        await store.ingest(rec(body("a-late", "agent.chat.turn.started", "chat_a", "turn_9")))
        row = await store.get_session("chat_a")
        assert row is not None
        assert orjson.loads(row.snapshot)["counts"]["turns"] == 4
    finally:
        await store.close()
    conn = await asyncpg.connect(pg_url)
    try:
        stored = await conn.fetchval("SELECT snapshot FROM sessions WHERE session_id = 'chat_a'")
        assert stored[:1] == b"\x01"
    finally:
        await conn.close()


async def _reads(store: PostgresStore) -> list[object]:
    as_of = await store.last_seq()
    return [
        await store.get_session("chat_a"),
        await store.list_sessions(SessionQuery(as_of)),
        await store.list_sessions(SessionQuery(as_of, None, 50, "ready", "running")),
        await store.list_turns("chat_a", 0, 100),
        await store.list_session_changes("chat_a", 0, 1000),
        await store.list_session_changes("chat_b", 3, 1000, ("raw.*",)),
        await store.list_changes(0, 1000, ("raw.*",)),
        await store.list_events(0, 1000),
        await store.list_session_events("chat_b", 0, 1000),
    ]
