"""The PostgreSQL migration runner: versions with gaps, and a version that comes late."""

from __future__ import annotations

import asyncpg

from relay.store.postgres_migrate import migrate_connection, postgres_migrations


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
