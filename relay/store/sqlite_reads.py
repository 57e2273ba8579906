"""A small pool of read connections to the SQLite file.

Each aiosqlite connection runs its statements one at a time on a thread of its own, so
with one connection a slow page held up every other read behind it, API-key lookups
included. In WAL mode readers do not block each other nor the writer: a few
connections let reads proceed side by side.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite

READ_CONNECTIONS = 4


class ReadPool:
    def __init__(self, connections: list[aiosqlite.Connection]) -> None:
        self._all = connections
        self._idle: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        for conn in connections:
            self._idle.put_nowait(conn)

    @classmethod
    async def open(
        cls, path: Path, busy_timeout_ms: float, size: int = READ_CONNECTIONS
    ) -> ReadPool:
        connections = []
        try:
            for _ in range(size):
                conn = await aiosqlite.connect(path)
                connections.append(conn)
                await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        except BaseException:
            for conn in connections:
                await conn.close()
            raise
        return cls(connections)

    async def read(self, sql: str, params: Any) -> list[Any]:
        """All rows of one statement, on whichever connection is free first."""
        conn = await self._idle.get()
        try:
            async with conn.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        finally:
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()


# Every type in the change log, one index seek each (a loose scan of `changes_by_type`).
CHANGE_TYPES = """
WITH RECURSIVE t(type) AS (
    SELECT (SELECT min(type) FROM changes)
    UNION ALL
    SELECT (SELECT min(type) FROM changes WHERE type > t.type) FROM t WHERE t.type IS NOT NULL
)
SELECT type FROM t WHERE type IS NOT NULL
"""

_CHANGE_ROW = "c.id, c.type, c.session_id, c.turn_id, c.body, {raw}"
_CHANGE_FROM = "changes c LEFT JOIN events e ON c.body = x'' AND e.seq = c.event_seq"


def changes_query(
    raw_columns: str,
    after: int,
    limit: int,
    types: tuple[str, ...],
    exclude: tuple[str, ...],
    glob: Callable[[str], str],
) -> tuple[str, tuple[Any, ...]]:
    """The SQL (and parameters) of a page of the change log after `after`.

    Exact type names are read type by type through the `changes_by_type` index, each in
    id order, and merged, so a type that is rare costs no scan of the log; globs and
    exclusions filter the log in id order.
    """
    columns = _CHANGE_ROW.format(raw=raw_columns)
    names = tuple(dict.fromkeys(types))
    if names and not exclude and not any(c in name for name in names for c in "*?"):
        one = (
            f"SELECT * FROM (SELECT {columns} FROM {_CHANGE_FROM}"
            " WHERE c.type = ? AND c.id > ? ORDER BY c.id LIMIT ?)"
        )
        sql = " UNION ALL ".join([one] * len(names)) + " ORDER BY 1 LIMIT ?"
        return sql, (*(p for name in names for p in (name, after, limit)), limit)
    where = " OR ".join(["c.type GLOB ?"] * len(types))
    sql = (
        f"SELECT {columns} FROM {_CHANGE_FROM} WHERE c.id > ?"
        + (f" AND ({where})" if where else "")
        + " AND c.type NOT GLOB ?" * len(exclude)
        + " ORDER BY c.id LIMIT ?"
    )
    return sql, (after, *map(glob, types), *map(glob, exclude), limit)


def session_changes_query(
    raw_columns: str,
    session_id: str,
    after: int,
    limit: int,
    exclude: tuple[str, ...],
    glob: Callable[[str], str],
) -> tuple[str, tuple[Any, ...]]:
    """The SQL (and parameters) of a page of one session's changes after `after`.

    A change's id grows with the seq of the event that caused it, so the changes of the
    session's events from the one behind `after` on, read through `events_by_session`
    and `changes_by_event`, come in id order; the changes no event caused (alerts) come
    from `alert_changes_by_session`. Neither read looks at other sessions' changes.
    """
    columns = _CHANGE_ROW.format(raw=raw_columns)
    excluded = " AND c.type NOT GLOB ?" * len(exclude)
    globs = tuple(map(glob, exclude))
    sql = (
        f"SELECT * FROM (SELECT {columns} FROM events e"
        " JOIN changes c INDEXED BY changes_by_event ON c.event_seq = e.seq"
        " WHERE e.session_id = ? AND e.seq >= coalesce((SELECT event_seq FROM changes"
        " WHERE id <= ? AND event_seq IS NOT NULL ORDER BY id DESC LIMIT 1), 0)"
        f" AND c.id > ?{excluded} ORDER BY e.seq, c.id LIMIT ?)"
        " UNION ALL"
        f" SELECT * FROM (SELECT c.id, c.type, c.session_id, c.turn_id, c.body,"
        f" {', '.join(['NULL'] * len(raw_columns.split(',')))}"
        " FROM changes c INDEXED BY alert_changes_by_session"
        f" WHERE c.session_id = ? AND c.event_seq IS NULL AND c.id > ?{excluded}"
        " ORDER BY c.id LIMIT ?)"
        " ORDER BY 1 LIMIT ?"
    )
    params = (session_id, after, after, *globs, limit, session_id, after, *globs, limit, limit)
    return sql, params
