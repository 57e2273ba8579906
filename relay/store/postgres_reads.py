"""The PostgreSQL store's reads: each served from an index, on the pool's connections."""

from __future__ import annotations

from typing import Any

import asyncpg

from relay.changes import StoredChange, glob_pattern, stored_body
from relay.store import ApiKey, SessionQuery, SessionRow, StoredEvent, StoreUnavailable

_EVENT_COLUMNS = (
    "seq, source, event_id, type, session_id, turn_id, occurred_at, received_at, payload"
)
# Sessions in order of their newest activity as of a seq. Those whose newest event is
# at most `top` (the as-of seq, or the cursor's activity if lower) come from the
# `sessions_by_activity` index read backwards; those whose newest event is past the as-of
# seq (few: the most recent) are placed by their newest event up to it.
_SESSION_PAGE = """
SELECT session_id, version, snapshot, act FROM (
    (SELECT session_id, version, snapshot, activity_seq AS act FROM sessions
    WHERE activity_seq <= $2 AND NOT (activity_seq = $5 AND session_id >= $6)
      AND ($3::text IS NULL OR readiness = $3) AND ($4::text IS NULL OR turn_status = $4)
    ORDER BY activity_seq DESC, session_id DESC
    LIMIT $7)
    UNION ALL
    SELECT session_id, version, snapshot, act FROM (
        SELECT s.session_id, s.version, s.snapshot, (
            SELECT max(e.seq) FROM events e WHERE e.session_id = s.session_id AND e.seq <= $1
        ) AS act
        FROM sessions s
        WHERE s.activity_seq > $1
          AND ($3::text IS NULL OR s.readiness = $3)
          AND ($4::text IS NULL OR s.turn_status = $4)
    ) moved
    WHERE act IS NOT NULL AND act <= $2 AND NOT (act = $5 AND session_id >= $6)
) page
ORDER BY act DESC, session_id DESC
LIMIT $7
"""
# Every type in the change log, one index seek each (a loose scan of `changes_by_type`).
_CHANGE_TYPES = """
WITH RECURSIVE t(type) AS (
    SELECT (SELECT min(type) FROM changes)
    UNION ALL
    SELECT (SELECT min(type) FROM changes WHERE type > t.type) FROM t WHERE t.type IS NOT NULL
)
SELECT type FROM t WHERE type IS NOT NULL
"""
# The changes of the given types, each type read in id order through `changes_by_type`,
# merged in id order.
_TYPED_CHANGE_PAGE = """
SELECT c.id, c.type, c.session_id, c.turn_id, c.body,
    e.type, e.occurred_at, e.session_id, e.turn_id, e.event_id, e.source, e.payload
FROM (
    SELECT c.* FROM unnest($2::text[]) AS wanted(type)
    CROSS JOIN LATERAL (
        SELECT * FROM changes WHERE type = wanted.type AND id > $1 ORDER BY id LIMIT $3
    ) c
    ORDER BY c.id
    LIMIT $3
) c
LEFT JOIN events e ON octet_length(c.body) = 0 AND e.seq = c.event_seq
ORDER BY c.id
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
        after_act, after_id = query.after or (-1, "")
        top = query.as_of_seq if query.after is None else min(query.as_of_seq, after_act)
        rows = await self._fetch(
            _SESSION_PAGE,
            query.as_of_seq,
            top,
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
        if types and not exclude:
            if any(c in t for t in types for c in "*?"):
                # Globs become the types in the log they match, each read through its index.
                pattern = glob_pattern(types)
                found = await self._fetch(_CHANGE_TYPES)
                types = tuple(t for (t,) in found if pattern.fullmatch(t))
                if not types:
                    return []
            rows = await self._fetch(_TYPED_CHANGE_PAGE, after, list(dict.fromkeys(types)), limit)
        else:
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
