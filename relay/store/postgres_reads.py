"""The PostgreSQL store's reads: each served from an index, on the pool's connections."""

from __future__ import annotations

from typing import Any

import asyncpg

from relay.changes import StoredChange, stored_body
from relay.store import ApiKey, SessionQuery, SessionRow, StoredEvent, StoreUnavailable

_EVENT_COLUMNS = (
    "seq, source, event_id, type, session_id, turn_id, occurred_at, received_at, payload"
)
# Sessions in order of their newest activity as of a seq: those whose newest event is
# past it (few: the most recent) are placed by their newest event up to it; the others
# come from the index in order, from the page's cursor on.
_SESSION_PAGE = """
WITH recent AS (
    SELECT s.session_id, s.version, s.snapshot, s.readiness, s.turn_status,
        (SELECT max(e.seq) FROM events e WHERE e.session_id = s.session_id AND e.seq <= $1)
        AS act
    FROM sessions s WHERE s.activity_seq > $1
), settled AS (
    SELECT session_id, version, snapshot, readiness, turn_status, activity_seq AS act
    FROM sessions
    WHERE activity_seq <= $1
      AND ($4::bigint IS NULL OR (activity_seq, session_id) < ($4, $5::text))
      AND ($2::text IS NULL OR readiness = $2) AND ($3::text IS NULL OR turn_status = $3)
    ORDER BY activity_seq DESC, session_id DESC
    LIMIT $6
)
SELECT session_id, version, snapshot, act FROM (
    SELECT * FROM recent UNION ALL SELECT * FROM settled
) page
WHERE act IS NOT NULL
  AND ($2::text IS NULL OR readiness = $2) AND ($3::text IS NULL OR turn_status = $3)
  AND ($4::bigint IS NULL OR (act, session_id) < ($4, $5::text))
ORDER BY act DESC, session_id DESC
LIMIT $6
"""
_CHANGE_PAGE = """
SELECT c.id, c.type, c.session_id, c.turn_id, c.body,
    e.type, e.occurred_at, e.session_id, e.turn_id, e.event_id, e.source, e.payload
FROM changes c
LEFT JOIN events e ON octet_length(c.body) = 0 AND e.seq = c.event_seq
WHERE c.id > $1
  AND (cardinality($2::text[]) = 0 OR c.type LIKE ANY ($2::text[]))
  AND NOT (c.type LIKE ANY ($3::text[]))
ORDER BY c.id
LIMIT $4
"""

# A session's changes, through the (session_id, id) index.
_SESSION_CHANGE_PAGE = """
SELECT c.id, c.type, c.session_id, c.turn_id, c.body,
    e.type, e.occurred_at, e.session_id, e.turn_id, e.event_id, e.source, e.payload
FROM changes c
LEFT JOIN events e ON octet_length(c.body) = 0 AND e.seq = c.event_seq
WHERE c.session_id = $1 AND c.id > $2
  AND NOT (c.type LIKE ANY ($3::text[]))
ORDER BY c.id
LIMIT $4
"""


def like_pattern(glob: str) -> str:
    """A type glob (`turn.*`, `raw.agent.?`) as a LIKE pattern."""
    escaped = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


class PostgresReads:
    def __init__(self) -> None:
        self._pool: asyncpg.Pool | None = None

    def _connected(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            async with self._connected().acquire() as conn:
                return list(await conn.fetch(sql, *args))
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"the store cannot be read: {exc}") from exc

    async def list_events(self, after: int, limit: int) -> list[StoredEvent]:
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
            after,
            limit,
        )
        return [StoredEvent(*row) for row in rows]

    async def last_seq(self) -> int:
        return await self._counter("event_seq")

    async def last_change_id(self) -> int:
        return await self._counter("change_id")

    async def _counter(self, name: str) -> int:
        """The counter as last committed: no transaction still holding it is counted."""
        rows = await self._fetch("SELECT value FROM counters WHERE name = $1", name)
        return int(rows[0][0])

    async def get_session(self, session_id: str) -> SessionRow | None:
        rows = await self._fetch(
            "SELECT session_id, version, snapshot, activity_seq FROM sessions"
            " WHERE session_id = $1",
            session_id,
        )
        return SessionRow(*rows[0]) if rows else None

    async def list_sessions(self, query: SessionQuery) -> list[SessionRow]:
        after_act, after_id = query.after or (None, None)
        rows = await self._fetch(
            _SESSION_PAGE,
            query.as_of_seq,
            query.readiness,
            query.turn_status,
            after_act,
            after_id,
            query.limit,
        )
        return [SessionRow(*row) for row in rows]

    async def list_turns(self, session_id: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        rows = await self._fetch(
            "SELECT position, snapshot FROM turns WHERE session_id = $1 AND position > $2"
            " ORDER BY position LIMIT $3",
            session_id,
            after,
            limit,
        )
        return [(position, snapshot) for position, snapshot in rows]

    async def list_session_events(
        self, session_id: str, after: int, limit: int
    ) -> list[StoredEvent]:
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = $1 AND seq > $2"
            " ORDER BY seq LIMIT $3",
            session_id,
            after,
            limit,
        )
        return [StoredEvent(*row) for row in rows]

    async def list_changes(
        self, after: int, limit: int, types: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
    ) -> list[StoredChange]:
        rows = await self._fetch(
            _CHANGE_PAGE,
            after,
            [like_pattern(t) for t in types],
            [like_pattern(t) for t in exclude],
            limit,
        )
        return [
            StoredChange(
                row[0], row[1], row[2], row[3], stored_body(row[0], row[4], tuple(row)[5:])
            )
            for row in rows
        ]

    async def list_session_changes(
        self, session_id: str, after: int, limit: int, exclude: tuple[str, ...] = ()
    ) -> list[StoredChange]:
        rows = await self._fetch(
            _SESSION_CHANGE_PAGE,
            session_id,
            after,
            [like_pattern(t) for t in exclude],
            limit,
        )
        return [
            StoredChange(
                row[0], row[1], row[2], row[3], stored_body(row[0], row[4], tuple(row)[5:])
            )
            for row in rows
        ]

    async def list_api_keys(self) -> list[ApiKey]:
        rows = await self._fetch(
            "SELECT id, name, scopes, created_at, revoked_at FROM api_keys ORDER BY created_at"
        )
        return [_api_key(row) for row in rows]

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        rows = await self._fetch(
            "SELECT id, name, scopes, created_at, revoked_at FROM api_keys WHERE key_hash = $1",
            key_hash,
        )
        return _api_key(rows[0]) if rows else None


def _api_key(row: Any) -> ApiKey:
    key_id, name, scopes, created_at, revoked_at = row
    return ApiKey(key_id, name, tuple(scopes.split()), created_at, revoked_at)
