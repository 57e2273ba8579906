"""The PostgreSQL schema: apply every packaged migration not yet applied.

Migrations are `relay/store/postgres_migrations/NNNN_*.sql`, applied in version order,
each recorded in `schema_migrations`, all in one transaction that holds an advisory
lock: instances that start together migrate once (the others wait, then find every
version applied), and a failed run leaves the schema as it was.
"""

from __future__ import annotations

import re
from importlib import resources

import asyncpg

from relay.timefmt import format_time, utcnow

# An arbitrary constant that names the migration lock among advisory locks.
MIGRATION_LOCK = 0x72656C6179  # "relay"


def postgres_migrations() -> list[tuple[int, str]]:
    """The packaged PostgreSQL migrations as (version, SQL), in order."""
    found = []
    folder = resources.files("relay.store").joinpath("postgres_migrations")
    for entry in folder.iterdir():
        match = re.match(r"(\d+)_.*\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text()))
    return sorted(found)


async def migrate_postgres(url: str) -> list[int]:
    """Bring the database at `url` up to date; return the versions applied now."""
    conn = await asyncpg.connect(url)
    try:
        return await migrate_connection(conn)
    finally:
        await conn.close()


async def migrate_connection(conn: asyncpg.Connection) -> list[int]:
    """Apply the missing migrations on `conn`, under the migration lock."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, sql in postgres_migrations():
            if version in done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                version,
                format_time(utcnow()),
            )
            applied.append(version)
        return applied
