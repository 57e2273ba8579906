"""The test servers for cluster mode answer."""

from __future__ import annotations

import asyncpg
import redis.asyncio as aioredis


async def test_a_fresh_postgresql_database_is_empty_and_writable(pg_url: str) -> None:
    """Each test gets its own empty database."""
    conn = await asyncpg.connect(pg_url)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        await conn.execute("CREATE TABLE probe (id int)")
        await conn.execute("INSERT INTO probe VALUES (1)")
        assert tables == 0
        assert await conn.fetchval("SELECT id FROM probe") == 1
    finally:
        await conn.close()


async def test_redis_carries_a_message_in_the_test_namespace(
    redis_namespace: tuple[str, str],
) -> None:
    """Redis answers, and a key set in the namespace reads back."""
    url, prefix = redis_namespace
    client = aioredis.from_url(url)
    try:
        await client.set(f"{prefix}:probe", b"1")
        assert await client.get(f"{prefix}:probe") == b"1"
    finally:
        await client.aclose()
