"""Retention: what one small batch of pruning deletes, on the writer's connection.

Everything received before the cutoff goes, oldest first, a bounded number of rows per
table and batch: the change log up to the newest change of an old event; the derived
state (session, turns, alert deadlines) of sessions with no activity since the cutoff;
then the events of sessions that have no derived state any more (or never had any).
Events of a live session all stay, so its state can still be folded from its events.
Finished deliveries and delivery attempts older than the cutoff go too.

The newest event and the newest change always stay: the next seq and change id are
counted on from them. An event goes only after every change that points at it (a raw
change is read back from its event's row), and a change only once the webhook dispatcher
has queued it and no delivery still has to send it.

The rules are shared with the PostgreSQL store (`postgres_retention`), which runs the
same batches in SQL of its own; so is the loop that paces the batches (`run_pruning`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from relay.config import RetentionSettings
from relay.timefmt import format_unix

log = structlog.get_logger("relay.store")


@dataclass(frozen=True, slots=True)
class Pruned:
    rows: int  # rows deleted in this batch
    full: bool  # some table had more to delete than the batch allowed
    sessions: tuple[str, ...]  # sessions whose derived state went


NOTHING = Pruned(0, False, ())


def changes_through(
    boundary: int, pending: int | None, queued: int | None, subscribed: bool
) -> int:
    """The newest change id that may go: at most `boundary` (the newest change of an old
    event), and before the oldest change a delivery still has to send (`pending`) and
    after the dispatcher's cursor (`queued`) while anyone subscribes (the dispatcher
    idles, its cursor staying, while nobody does)."""
    if pending is not None:
        boundary = min(boundary, pending - 1)
    if queued is not None and subscribed:
        boundary = min(boundary, queued)
    return boundary


def events_below(old_seq: int, first_pointed: int | None) -> int:
    """Events with a lower seq may go (if their session has no derived state): up to the
    newest old event, and before the first event a kept change still points at."""
    return min(old_seq + 1, first_pointed if first_pointed is not None else old_seq + 1)


async def run_pruning(
    prune: Callable[[float, int], Awaitable[Pruned]],
    retention: RetentionSettings,
    keep_seconds: float,
    warn: Callable[[str, str], None],
) -> None:
    """Call `prune(cutoff, batch_rows)` forever: after `batch_pause_seconds` while a batch
    was full, else after `interval_seconds`; a failed batch is warned about and retried."""
    pause = retention.interval_seconds
    while True:
        await asyncio.sleep(pause)
        pause = retention.interval_seconds
        try:
            pruned = await prune(time.time() - keep_seconds, retention.batch_rows)
        except Exception as exc:
            warn("store.prune_failed", str(exc))
            continue
        if pruned.rows:
            log.debug("store.pruned", rows=pruned.rows)
        if pruned.full:
            pause = retention.batch_pause_seconds


def prune_batch(conn: sqlite3.Connection, cutoff: float, limit: int) -> Pruned:
    """Delete up to `limit` rows per table of what was received before `cutoff` (unix
    seconds). Runs inside the caller's transaction."""
    counts: list[int] = []
    sessions: tuple[str, ...] = ()
    old_seq = _one(
        conn,
        "SELECT seq FROM events WHERE received_at < ? ORDER BY received_at DESC LIMIT 1",
        (format_unix(cutoff),),
    )
    if old_seq is not None:
        sessions = _prune_sessions(conn, old_seq, limit)
        counts.append(len(sessions))
        counts.append(_prune_changes(conn, old_seq, limit))
        counts.append(_prune_events(conn, old_seq, limit))
    counts += _prune_deliveries(conn, cutoff, limit)
    return Pruned(sum(counts), any(count >= limit for count in counts), sessions)


def _prune_sessions(conn: sqlite3.Connection, old_seq: int, limit: int) -> tuple[str, ...]:
    ids = tuple(
        row[0]
        for row in conn.execute(
            "SELECT session_id FROM sessions WHERE activity_seq <= ? ORDER BY activity_seq LIMIT ?",
            (old_seq, limit),
        )
    )
    if ids:
        marks = ",".join("?" * len(ids))
        for table in ("turns", "alerts", "session_facts", "sessions"):
            conn.execute(f"DELETE FROM {table} WHERE session_id IN ({marks})", ids)
        conn.execute(  # for `check-state`: derived state may be missing from here on
            "INSERT INTO store_facts (name, value) VALUES ('pruned_through_seq', ?)"
            " ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
            (old_seq,),
        )
    return ids


def _prune_changes(conn: sqlite3.Connection, old_seq: int, limit: int) -> int:
    boundary = _one(
        conn,
        "SELECT id FROM changes WHERE event_seq <= ? ORDER BY event_seq DESC, id DESC LIMIT 1",
        (old_seq,),
    )
    if boundary is None:
        return 0
    # Changes that deliveries still have to send, or that are not queued yet, stay.
    pending = _one(
        conn, "SELECT min(change_id) FROM deliveries WHERE next_attempt_at IS NOT NULL", ()
    )
    queued = _one(
        conn,
        "SELECT last_change_id FROM delivery_cursor WHERE EXISTS (SELECT 1 FROM subscriptions)",
        (),
    )
    boundary = changes_through(boundary, pending, queued, subscribed=queued is not None)
    return conn.execute(
        "DELETE FROM changes WHERE id <= min(?, (SELECT min(id) FROM changes) + ? - 1)"
        " AND id < (SELECT max(id) FROM changes)",
        (boundary, limit),
    ).rowcount


def _prune_events(conn: sqlite3.Connection, old_seq: int, limit: int) -> int:
    first_pointed = _one(
        conn, "SELECT event_seq FROM changes WHERE event_seq IS NOT NULL ORDER BY id LIMIT 1", ()
    )
    below = events_below(old_seq, first_pointed)
    return conn.execute(
        "DELETE FROM events WHERE seq IN (SELECT e.seq FROM events e WHERE e.seq < ?"
        " AND e.seq < (SELECT max(seq) FROM events)"
        " AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = e.session_id)"
        " ORDER BY e.seq LIMIT ?)",
        (below, limit),
    ).rowcount


def _prune_deliveries(conn: sqlite3.Connection, cutoff: float, limit: int) -> list[int]:
    """Old attempts, then old finished deliveries, among the oldest `limit` rows of each."""
    attempts = conn.execute(
        "DELETE FROM delivery_attempts WHERE id IN (SELECT id FROM"
        " (SELECT id, at FROM delivery_attempts ORDER BY id LIMIT ?) WHERE at < ?)",
        (limit, cutoff),
    ).rowcount
    finished = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM (SELECT id, next_attempt_at, updated_at FROM deliveries"
            " ORDER BY id LIMIT ?) WHERE next_attempt_at IS NULL AND updated_at < ?",
            (limit, cutoff),
        )
    ]
    if finished:
        marks = ",".join("?" * len(finished))
        conn.execute(f"DELETE FROM delivery_attempts WHERE delivery_id IN ({marks})", finished)
        conn.execute(f"DELETE FROM deliveries WHERE id IN ({marks})", finished)
    return [attempts, len(finished)]


def _one(conn: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> int | None:
    row = conn.execute(sql, params).fetchone()
    return None if row is None or row[0] is None else int(row[0])
