"""PostgreSQL and Redis for the cluster tests: a fresh database and a Redis namespace
per test, on the servers at 127.0.0.1 (`scripts/services start` starts them).

Where a server does not answer, the tests that need it are skipped, saying so, except
under CI (`CI=true`), where a missing server is a failure.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

PG_ADMIN_URL = os.environ.get("RELAY_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("RELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _require(name: str, host: str, port: int) -> None:
    if _answers(host, port):
        return
    message = f"{name} is not answering on {host}:{port} (scripts/services start)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _with_database(url: str, database: str) -> str:
    head, _, _ = url.rpartition("/")
    return f"{head}/{database}"


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    _require("PostgreSQL", "127.0.0.1", 5432)
    name = f"relay_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _with_database(PG_ADMIN_URL, name)
    finally:
        admin = await asyncpg.connect(PG_ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def redis_namespace() -> AsyncIterator[tuple[str, str]]:
    """(Redis URL, a key and channel prefix no other test uses); its keys go after."""
    _require("Redis", "127.0.0.1", 6379)
    prefix = f"relay-test-{uuid.uuid4().hex[:12]}"
    yield REDIS_URL, prefix
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
