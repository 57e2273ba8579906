"""The PostgreSQL store's reads: each served from an index, on the pool's connections."""

from __future__ import annotations

from typing import Any

import asyncpg

from relay.changes import StoredChange, glob_pattern, stored_body
from relay.packed_bodies import unpack
from relay.state import Readiness, SessionTurnStatus
from relay.store import (
    EVENT_COLUMNS,
    ApiKey,
    SessionQuery,
    SessionRow,
    StoredEvent,
    StoreUnavailable,
)
from relay.store.sqlite_reads import CHANGE_TYPES  # the same SQL on both engines

# Sessions in order of their newest activity as of a seq, for the (readiness, turn
# status) pairs the filters admit. Those whose newest event is at most `top` (the as-of
# seq, or the cursor's activity if lower) come from `sessions_by_status`, each pair's
# range read backwards from `top` and merged, so a page reads at most `limit` rows per
# pair however many sessions there are and however rare the pair; those whose newest
# event is past the as-of seq (few: the most recent) are placed by their newest event
# up to it (the upper bound, the largest seq, tells a generic plan that they are few).
_SESSION_PAGE = """
SELECT session_id, version, snapshot, act FROM (
    SELECT p.* FROM unnest($3::text[]) AS r (readiness)
    CROSS JOIN unnest($4::text[]) AS t (turn_status)
    CROSS JOIN LATERAL (
        SELECT session_id, version, snapshot, activity_seq AS act FROM sessions
        WHERE readiness = r.readiness AND turn_status = t.turn_status
          AND activity_seq <= $2 AND NOT (activity_seq = $5 AND session_id >= $6)
        ORDER BY activity_seq DESC, session_id DESC
        LIMIT $7
    ) p
    UNION ALL
    SELECT session_id, version, snapshot, act FROM (
        SELECT s.session_id, s.version, s.snapshot, (
            SELECT max(e.seq) FROM events e WHERE e.session_id = s.session_id AND e.seq <= $1
        ) AS act
        FROM sessions s
        WHERE s.activity_seq > $1 AND s.activity_seq <= $8
          AND s.readiness = ANY($3::text[]) AND s.turn_status = ANY($4::text[])
    ) moved
    WHERE act IS NOT NULL AND act <= $2 AND NOT (act = $5 AND session_id >= $6)
) page
ORDER BY act DESC, session_id DESC
LIMIT $7
"""
MAX_SEQ = 2**63 - 1
_READINESS = tuple(r.value for r in Readiness)
_TURN_STATUS = tuple(t.value for t in SessionTurnStatus)
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

# A session's changes after an id: those of its events from the one that caused the
# change at that id on (`events_by_session`, then `changes_by_event`; a change's id grows
# with its event's seq, so they come in id order; each event's changes are read by its
# seq alone, or the planner may read every change past the id instead), and those no
# event caused (alerts,
# through `alert_changes_by_session`). Neither read looks at other sessions' changes.
_SESSION_CHANGE_PAGE = """
SELECT * FROM (
    (SELECT c.id, c.type, c.session_id, c.turn_id, c.body,
        e.type, e.occurred_at, e.session_id, e.turn_id, e.event_id, e.source, e.payload
    FROM events e
    CROSS JOIN LATERAL (SELECT * FROM changes c WHERE c.event_seq = e.seq OFFSET 0) c
    WHERE e.session_id = $1 AND e.seq >= coalesce((
        SELECT event_seq FROM changes
        WHERE id <= $2 AND event_seq IS NOT NULL ORDER BY id DESC LIMIT 1
    ), 0)
      AND c.id > $2 AND NOT (c.type LIKE ANY ($3::text[]))
    ORDER BY e.seq, c.id
    LIMIT $4)
    UNION ALL
    (SELECT c.id, c.type, c.session_id, c.turn_id, c.body,
        NULL, NULL, NULL, NULL, NULL, NULL, NULL::bytea
    FROM changes c
    WHERE c.session_id = $1 AND c.event_seq IS NULL AND c.id > $2
      AND NOT (c.type LIKE ANY ($3::text[]))
    ORDER BY c.id
    LIMIT $4)
) page
ORDER BY 1
LIMIT $4
"""


def session_page_args(query: SessionQuery) -> tuple[Any, ...]:
    """The parameters of `_SESSION_PAGE` for `query`: each filter as the values it admits."""
    after_act, after_id = query.after or (-1, "")
    top = query.as_of_seq if query.after is None else min(query.as_of_seq, after_act)
    readiness = _READINESS if query.readiness is None else (query.readiness,)
    turn_status = _TURN_STATUS if query.turn_status is None else (query.turn_status,)
    return (
        query.as_of_seq,
        top,
        list(readiness),
        list(turn_status),
        after_act,
        after_id,
        query.limit,
        MAX_SEQ,
    )


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
            f"SELECT {EVENT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
            after,
            limit,
        )
        return [_event(row) for row in rows]

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
        if not rows:
            return None
        sid, version, snapshot, act = rows[0]
        return SessionRow(sid, version, unpack(snapshot), act)

    async def list_sessions(self, query: SessionQuery) -> list[SessionRow]:
        rows = await self._fetch(
            _SESSION_PAGE,
            *session_page_args(query),
        )
        return [
            SessionRow(sid, version, unpack(snapshot), act) for sid, version, snapshot, act in rows
        ]

    async def list_turns(self, session_id: str, after: int, limit: int) -> list[tuple[int, bytes]]:
        rows = await self._fetch(
            "SELECT position, snapshot FROM turns WHERE session_id = $1 AND position > $2"
            " ORDER BY position LIMIT $3",
            session_id,
            after,
            limit,
        )
        return [(position, unpack(snapshot)) for position, snapshot in rows]

    async def list_session_events(
        self, session_id: str, after: int, limit: int
    ) -> list[StoredEvent]:
        rows = await self._fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE session_id = $1 AND seq > $2"
            " ORDER BY seq LIMIT $3",
            session_id,
            after,
            limit,
        )
        return [_event(row) for row in rows]

    async def list_changes(
        self, after: int, limit: int, types: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
    ) -> list[StoredChange]:
        if types and not exclude:
            if any(c in t for t in types for c in "*?"):
                # Globs become the types in the log they match, each read through its index.
                pattern = glob_pattern(types)
                found = await self._fetch(CHANGE_TYPES)
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


def _event(row: Any) -> StoredEvent:
    seq, source, event_id, kind, session_id, turn_id, occurred_at, received_at, payload = row
    return StoredEvent(
        seq, source, event_id, kind, session_id, turn_id, occurred_at, received_at, unpack(payload)
    )


def _api_key(row: Any) -> ApiKey:
    key_id, name, scopes, created_at, revoked_at = row
    return ApiKey(key_id, name, tuple(scopes.split()), created_at, revoked_at)
