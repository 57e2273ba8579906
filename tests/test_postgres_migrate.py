"""The PostgreSQL migration runner: versions with gaps, a version that comes late, and
an upgrade of a database made before alert formats."""

from __future__ import annotations

import asyncpg

from relay.config import StoreSettings
from relay.store.postgres_migrate import migrate_connection, postgres_migrations
from relay.webhooks.formats import Format
from relay.webhooks.store import open_delivery_store


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
