"""Follows in the PostgreSQL store: positions and leases shared by every instance.

A claim takes running follows whose lease has ended (or is the claimer's own) with
`FOR UPDATE SKIP LOCKED`, so two instances never take the same follow at once; a
position is written only by the instance that holds the lease.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg

from relay.store import (
    ACTIVE_FOLLOW_STATES,
    FOLLOW_COLUMNS,
    Follow,
    StoreUnavailable,
    check_follow_changes,
)
from relay.store.postgres_reads import PostgresReads

_ACTIVE = list(ACTIVE_FOLLOW_STATES)


class PostgresFollows(PostgresReads):
    async def _execute(self, sql: str, *args: Any) -> str:
        try:
            async with self._connected().acquire() as conn:
                return str(await conn.execute(sql, *args))
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"the store cannot write: {exc}") from exc

    async def start_follow(self, source: str, session_id: str, now: str) -> Follow:
        await self._execute(
            "INSERT INTO follows AS f (source, session_id, state, created_at, updated_at)"
            " VALUES ($1, $2, 'following', $3, $3) ON CONFLICT (source, session_id) DO UPDATE"
            " SET state = 'following', attempts = 0, last_error = NULL, updated_at = $3"
            " WHERE NOT (f.state = ANY($4::text[]))",
            source,
            session_id,
            now,
            _ACTIVE,
        )
        found = await self._fetch(
            f"SELECT {FOLLOW_COLUMNS} FROM follows WHERE source = $1 AND session_id = $2",
            source,
            session_id,
        )
        return Follow(*found[0])

    async def list_follows(self, source: str) -> list[Follow]:
        rows = await self._fetch(
            f"SELECT {FOLLOW_COLUMNS} FROM follows WHERE source = $1"
            " ORDER BY created_at, session_id",
            source,
        )
        return [Follow(*row) for row in rows]

    async def claim_follows(
        self, owner: str, now: float, lease_until: float, limit: int
    ) -> list[Follow]:
        await self._execute(
            "WITH free AS ("
            " SELECT source, session_id FROM follows"
            " WHERE state = ANY($4::text[]) AND (owner = $1 OR owner IS NULL OR lease_until < $2)"
            " ORDER BY lease_until LIMIT $5 FOR UPDATE SKIP LOCKED)"
            " UPDATE follows f SET owner = $1, lease_until = $3 FROM free"
            " WHERE f.source = free.source AND f.session_id = free.session_id",
            owner,
            now,
            lease_until,
            _ACTIVE,
            limit,
        )
        held = await self._fetch(
            f"SELECT {FOLLOW_COLUMNS} FROM follows WHERE owner = $1 AND state = ANY($2::text[])"
            " AND lease_until >= $3 ORDER BY created_at, session_id",
            owner,
            _ACTIVE,
            lease_until,
        )
        return [Follow(*row) for row in held]

    async def update_follow(
        self,
        owner: str,
        source: str,
        session_id: str,
        changes: Mapping[str, object],
        now: str,
    ) -> bool:
        check_follow_changes(changes)
        names = list(changes)
        assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, start=1))
        n = len(names)
        status = await self._execute(
            f"UPDATE follows SET {assignments}, updated_at = ${n + 1}"
            f" WHERE source = ${n + 2} AND session_id = ${n + 3} AND owner = ${n + 4}",
            *changes.values(),
            now,
            source,
            session_id,
            owner,
        )
        return status.split()[-1] != "0"

    async def release_follows(self, owner: str) -> None:
        await self._execute("UPDATE follows SET lease_until = 0 WHERE owner = $1", owner)
