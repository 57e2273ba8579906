"""Retention on PostgreSQL: one small batch of pruning, in one short transaction.

The rules are the embedded store's (see `retention`); what several instances sharing the
database add:

- one instance prunes at a time: a batch runs only while its transaction holds the
  retention advisory lock (`pg_try_advisory_xact_lock`); an instance that does not get it
  prunes nothing this time, and tries again after its interval;
- a quiet session's derived state goes only once its facts row is claimed (`FOR UPDATE
  SKIP LOCKED`: pruning never waits for an ingest that holds it), and its session row
  only while it is still quiet when deleted (an ingest that made it live meanwhile has
  committed, and the delete sees its activity);
- the delivery cursor is read before the deliveries still to send: a change the
  dispatcher queues in between has its delivery row visible by then.

Ingest never waits long behind a batch: it deletes at most `limit` rows per table, waits
at most `_LOCK_TIMEOUT` for a row that another transaction holds, and commits.
"""

from __future__ import annotations

import asyncpg

from relay.store.retention import Pruned, changes_through, events_below
from relay.timefmt import format_unix

RETENTION_LOCK = 0x7072756E65  # "prune": names the retention lock among advisory locks
_LOCK_TIMEOUT = "2s"


async def prune_batch(conn: asyncpg.Connection, cutoff: float, limit: int) -> Pruned | None:
    """Delete up to `limit` rows per table of what was received before `cutoff` (unix
    seconds), in one transaction; None when another instance is pruning."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", RETENTION_LOCK):
            return None
        await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
        counts: list[int] = []
        sessions: tuple[str, ...] = ()
        old_seq = await conn.fetchval(
            "SELECT seq FROM events WHERE received_at < $1 ORDER BY received_at DESC LIMIT 1",
            format_unix(cutoff),
        )
        if old_seq is not None:
            sessions = await _prune_sessions(conn, old_seq, limit)
            counts.append(len(sessions))
            counts.append(await _prune_changes(conn, old_seq, limit))
            counts.append(await _prune_events(conn, old_seq, limit))
        counts += await _prune_deliveries(conn, cutoff, limit)
    return Pruned(sum(counts), any(count >= limit for count in counts), sessions)


async def _prune_sessions(conn: asyncpg.Connection, old_seq: int, limit: int) -> tuple[str, ...]:
    candidates = await conn.fetch(
        "SELECT session_id FROM sessions WHERE activity_seq <= $1 ORDER BY activity_seq LIMIT $2",
        old_seq,
        limit,
    )
    if not candidates:
        return ()
    claimed = await conn.fetch(
        "SELECT session_id FROM session_facts WHERE session_id = ANY($1::text[])"
        " ORDER BY session_id FOR UPDATE SKIP LOCKED",
        [row[0] for row in candidates],
    )
    gone = await conn.fetch(
        "DELETE FROM sessions WHERE session_id = ANY($1::text[]) AND activity_seq <= $2"
        " RETURNING session_id",
        [row[0] for row in claimed],
        old_seq,
    )
    ids = sorted(row[0] for row in gone)
    for table in ("turns", "alerts", "session_facts"):
        await conn.execute(f"DELETE FROM {table} WHERE session_id = ANY($1::text[])", ids)
    return tuple(ids)


async def _prune_changes(conn: asyncpg.Connection, old_seq: int, limit: int) -> int:
    boundary = await conn.fetchval(
        "SELECT id FROM changes WHERE event_seq <= $1 ORDER BY event_seq DESC, id DESC LIMIT 1",
        old_seq,
    )
    if boundary is None:
        return 0
    # The cursor first: deliveries for what it has passed are committed by then.
    queued = await conn.fetchval("SELECT last_change_id FROM delivery_cursor WHERE id = 1")
    subscribed = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM subscriptions)")
    pending = await conn.fetchval(
        "SELECT min(change_id) FROM deliveries WHERE next_attempt_at IS NOT NULL"
    )
    status: str = await conn.execute(
        "DELETE FROM changes WHERE id <= least($1::bigint, (SELECT min(id) FROM changes) + $2 - 1)"
        " AND id < (SELECT max(id) FROM changes)",
        changes_through(boundary, pending, queued, bool(subscribed)),
        limit,
    )
    return _rows(status)


async def _prune_events(conn: asyncpg.Connection, old_seq: int, limit: int) -> int:
    first_pointed = await conn.fetchval(
        "SELECT event_seq FROM changes WHERE event_seq IS NOT NULL ORDER BY id LIMIT 1"
    )
    status: str = await conn.execute(
        "DELETE FROM events WHERE seq IN (SELECT e.seq FROM events e WHERE e.seq < $1"
        " AND e.seq < (SELECT max(seq) FROM events)"
        " AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = e.session_id)"
        " ORDER BY e.seq LIMIT $2)",
        events_below(old_seq, first_pointed),
        limit,
    )
    return _rows(status)


async def _prune_deliveries(conn: asyncpg.Connection, cutoff: float, limit: int) -> list[int]:
    """Old attempts, then old finished deliveries (their attempts with them), among the
    oldest `limit` rows of each; a delivery queued again meanwhile stays."""
    attempts: str = await conn.execute(
        "DELETE FROM delivery_attempts WHERE id IN (SELECT id FROM"
        " (SELECT id, at FROM delivery_attempts ORDER BY id LIMIT $1) a WHERE at < $2)",
        limit,
        cutoff,
    )
    finished = await conn.fetch(
        "DELETE FROM deliveries WHERE id IN (SELECT id FROM"
        " (SELECT id, next_attempt_at, updated_at FROM deliveries ORDER BY id LIMIT $1) d"
        " WHERE next_attempt_at IS NULL AND updated_at < $2)"
        " AND next_attempt_at IS NULL AND updated_at < $2 RETURNING id",
        limit,
        cutoff,
    )
    return [_rows(attempts), len(finished)]


def _rows(status: str) -> int:
    """The row count of a command's status (`DELETE 12`)."""
    return int(status.rsplit(" ", 1)[1])
