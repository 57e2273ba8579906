"""The embedded delivery queue: deliveries and attempts in the relay's SQLite file.

Functions run on the delivery store's thread (`sqlite_store`), each on its connection
and, where it writes, in one transaction: enqueueing changes for subscriptions, claiming
due deliveries (a session's head only where the subscription orders by session),
recording attempts, retries and recovery.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from relay.changes import RAW_EVENT_COLUMNS
from relay.timefmt import format_unix
from relay.webhooks.fan_out import fan_out, incidents_needed
from relay.webhooks.formats import (
    Format,
    actions_json,
    incident_effect,
    replay_actions,
)
from relay.webhooks.model import (
    AttemptResult,
    ChangeFilter,
    ClaimedDelivery,
    Delivery,
    DeliveryStatus,
)
from relay.webhooks.store import ClaimRequest, DeliveryNotRetryable
from relay.webhooks.store_rows import attempt_args, claimed_delivery, result_args

T = TypeVar("T")

DELIVERY_COLUMNS = (
    "id, subscription_id, change_id, type, session_id, status, attempts, cycle_attempts,"
    " next_attempt_at, last_status, last_error, created_at, updated_at"
)
_CLAIM_BODY = (
    "SELECT d.id, d.change_id, d.type, coalesce(d.payload, c.body), d.cycle_attempts,"
    f" d.alert_actions, {RAW_EVENT_COLUMNS}"
    " FROM deliveries d LEFT JOIN changes c ON c.id = d.change_id"
    " LEFT JOIN events e ON c.body = x'' AND e.seq = c.event_seq"
)
_CLAIM_ANY = (
    _CLAIM_BODY
    + " WHERE d.subscription_id = ? AND d.next_attempt_at <= ? AND d.status != 'delivering'"
    " ORDER BY d.next_attempt_at, d.id LIMIT ?"
)
# Only the oldest unfinished delivery of each session may go (a claimed one included):
# the session's head, which `head` marks.
_CLAIM_SESSION_ORDERED = (
    _CLAIM_BODY + " WHERE d.subscription_id = ? AND d.head = 1 AND d.next_attempt_at IS NOT NULL"
    " AND d.next_attempt_at <= ? AND d.status != 'delivering'"
    " ORDER BY d.next_attempt_at, d.id LIMIT ?"
)
_NEXT_DUE_ANY = (
    "SELECT next_attempt_at FROM deliveries"
    " WHERE subscription_id = ? AND next_attempt_at IS NOT NULL AND status != 'delivering'"
    " ORDER BY next_attempt_at LIMIT 1"
)
_NEXT_DUE_SESSION_ORDERED = (
    "SELECT next_attempt_at FROM deliveries"
    " WHERE subscription_id = ? AND head = 1 AND next_attempt_at IS NOT NULL"
    " AND status != 'delivering' ORDER BY next_attempt_at LIMIT 1"
)
# A new row is its session's head if no older delivery of the session is active.
_INSERT_DELIVERY = (
    "INSERT OR IGNORE INTO deliveries (subscription_id, change_id, type, session_id, status,"
    " next_attempt_at, created_at, updated_at, alert_actions, head)"
    " SELECT ?1, ?2, ?3, ?4, 'pending', ?5, ?6, ?7, ?8, NOT EXISTS (SELECT 1 FROM deliveries e"
    "  WHERE e.subscription_id = ?1 AND e.session_id = ?4 AND e.change_id < ?2"
    "  AND e.next_attempt_at IS NOT NULL)"
)
_SESSION_FIRST = (
    "SELECT id FROM deliveries WHERE subscription_id = ?1 AND session_id = ?2"
    " AND next_attempt_at IS NOT NULL ORDER BY change_id LIMIT 1"
)
# After a delivery finished: the oldest active one of its session becomes the head.
_PROMOTE = (
    "UPDATE deliveries SET head = 1 WHERE id = (SELECT e.id FROM deliveries e"
    " WHERE e.subscription_id = ?1 AND e.next_attempt_at IS NOT NULL"
    " AND e.session_id = (SELECT session_id FROM deliveries WHERE id = ?2)"
    " ORDER BY e.change_id LIMIT 1)"
)
# After older deliveries of a session became active again (retry, recover).
_REHEAD = (
    "UPDATE deliveries SET head = (id IS (" + _SESSION_FIRST + "))"
    " WHERE subscription_id = ?1 AND session_id = ?2 AND next_attempt_at IS NOT NULL"
    " AND (head = 1 OR id IS (" + _SESSION_FIRST + "))"
)
_RECORD_DELIVERY = (
    "UPDATE deliveries SET status = ?, attempts = attempts + 1, cycle_attempts = ?,"
    " next_attempt_at = ?, last_status = ?, last_error = ?, updated_at = ? WHERE id = ?"
)
_RECORD_ATTEMPT = (
    "INSERT INTO delivery_attempts (delivery_id, at, status_code, latency_ms, response, error)"
    " SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM deliveries WHERE id = ?)"
)
_RECOVER_PAGE = 1000


class _Incidents:
    """The open PagerDuty incidents of subscriptions, read when first needed and written
    back (what was resolved removed, what was triggered added) in the same transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._read: dict[str, dict[str, int]] = {}
        self._before: dict[str, frozenset[str]] = {}

    def open(self, subscription_id: str) -> dict[str, int]:
        found = self._read.get(subscription_id)
        if found is None:
            found = dict(
                self._conn.execute(
                    "SELECT dedup_key, change_id FROM alert_incidents WHERE subscription_id = ?",
                    (subscription_id,),
                ).fetchall()
            )
            self._read[subscription_id] = found
            self._before[subscription_id] = frozenset(found)
        return found

    def write(self) -> None:
        for sid, keys in self._read.items():
            before = self._before[sid]
            self._conn.executemany(
                "DELETE FROM alert_incidents WHERE subscription_id = ? AND dedup_key = ?",
                [(sid, key) for key in before - set(keys)],
            )
            self._conn.executemany(
                "INSERT OR REPLACE INTO alert_incidents (subscription_id, dedup_key, change_id)"
                " VALUES (?, ?, ?)",
                [(sid, key, change_id) for key, change_id in keys.items()],
            )


def transaction(conn: sqlite3.Connection, work: Callable[[], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work()
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def select(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def delivery_of(row: Any) -> Delivery:
    (did, sid, change_id, change_type, session_id, status, attempts, cycle) = row[:8]
    next_at, last_status, last_error, created_at, updated_at = row[8:]
    return Delivery(
        did,
        sid,
        change_id,
        change_type,
        session_id,
        DeliveryStatus(status),
        attempts,
        cycle,
        next_at,
        last_status,
        last_error,
        created_at,
        updated_at,
    )


def release_claims(conn: sqlite3.Connection, now: float) -> int:
    def work() -> int:
        return conn.execute(
            "UPDATE deliveries SET next_attempt_at = ?,"
            " status = CASE WHEN cycle_attempts > 0 THEN 'retrying' ELSE 'pending' END"
            " WHERE status = 'delivering'",
            (now,),
        ).rowcount

    return transaction(conn, work)


def enqueue(conn: sqlite3.Connection, limit: int, now: float) -> tuple[int, dict[str, int]]:
    def work() -> tuple[int, dict[str, int]]:
        (cursor,) = conn.execute("SELECT last_change_id FROM delivery_cursor").fetchone()
        changes = conn.execute(
            "SELECT id, type, session_id, turn_id FROM changes WHERE id > ? ORDER BY id LIMIT ?",
            (cursor, limit),
        ).fetchall()
        if not changes:
            return 0, {}
        subscriptions = [
            (sid, ChangeFilter(tuple(orjson.loads(t)), tuple(orjson.loads(s))), start, fmt)
            for sid, t, s, start, fmt in conn.execute(
                # Disabled ones too: their deliveries wait, and go once they are enabled.
                "SELECT id, types, session_ids, start_after, format FROM subscriptions"
            )
        ]
        incidents = _Incidents(conn)
        needed = {sid: incidents.open(sid) for sid in incidents_needed(changes, subscriptions)}
        found, counts = fan_out(changes, subscriptions, needed)
        rows = [
            (sid, cid, kind, session, now, now, now, actions)
            for sid, cid, kind, session, actions in found
        ]
        conn.executemany(_INSERT_DELIVERY, rows)
        incidents.write()
        conn.execute("UPDATE delivery_cursor SET last_change_id = ?", (changes[-1][0],))
        return len(changes), counts

    return transaction(conn, work)


def claim(
    conn: sqlite3.Connection,
    requests: list[ClaimRequest],
    clock: Callable[[], float],
    lease_seconds: float,
) -> tuple[list[ClaimedDelivery], dict[str, float]]:
    def due(request: ClaimRequest, now: float, limit: int) -> list[Any]:
        sql = _CLAIM_SESSION_ORDERED if request.session_ordered else _CLAIM_ANY
        return conn.execute(sql, (request.subscription_id, now, limit)).fetchall()

    def next_due() -> dict[str, float]:
        found: dict[str, float] = {}
        for request in requests:
            sql = _NEXT_DUE_SESSION_ORDERED if request.session_ordered else _NEXT_DUE_ANY
            row = conn.execute(sql, (request.subscription_id,)).fetchone()
            if row is not None:
                found[request.subscription_id] = row[0]
        return found

    def work() -> tuple[list[ClaimedDelivery], dict[str, float]]:
        # The time is read here, on the store's thread, not when the claim was asked for.
        now = clock()
        lease_until = now + lease_seconds
        claimed: list[ClaimedDelivery] = []
        for request in requests:
            rows = due(request, now, request.limit)
            claimed += (claimed_delivery(request.subscription_id, row) for row in rows)
            if rows:
                conn.executemany(
                    "UPDATE deliveries SET status = 'delivering', next_attempt_at = ? WHERE id = ?",
                    [(lease_until, row[0]) for row in rows],
                )
        return claimed, next_due()

    # Nothing due: answer without taking the write lock.
    now = clock()
    if not any(due(request, now, 1) for request in requests):
        return [], next_due()
    return transaction(conn, work)


def record(conn: sqlite3.Connection, results: list[AttemptResult]) -> None:
    def work() -> None:
        deliveries, attempts = [], []
        last: dict[str, AttemptResult] = {}
        for result in results:
            deliveries.append(result_args(result))
            attempts.append((*attempt_args(result), result.attempt.delivery_id))
            last[result.subscription_id] = result
        conn.executemany(_RECORD_DELIVERY, deliveries)
        conn.executemany(_RECORD_ATTEMPT, attempts)
        conn.executemany(
            _PROMOTE,
            [
                (result.subscription_id, result.attempt.delivery_id)
                for result in results
                if result.next_attempt_at is None
            ],
        )
        for sid, result in last.items():
            if result.status is DeliveryStatus.DELIVERED:
                conn.execute(
                    "UPDATE subscriptions SET failing_since = NULL"
                    " WHERE id = ? AND failing_since IS NOT NULL",
                    (sid,),
                )
            else:  # an enable through the API after this attempt started the count afresh
                conn.execute(
                    "UPDATE subscriptions SET failing_since = ?"
                    " WHERE id = ? AND failing_since IS NULL"
                    " AND coalesce(enabled_changed_at, 0) < ?",
                    (result.attempt.at, sid, result.attempt.at),
                )
        for result in results:
            if result.disable_reason is not None:
                # Unless `enabled` was set through the API after the attempt decided it.
                conn.execute(
                    "UPDATE subscriptions SET enabled = 0, disabled_reason = ?,"
                    " updated_at = max(updated_at, ?)"
                    " WHERE id = ? AND enabled = 1 AND coalesce(enabled_changed_at, 0) < ?",
                    (
                        result.disable_reason,
                        format_unix(result.attempt.at),
                        result.subscription_id,
                        result.attempt.at,
                    ),
                )

    transaction(conn, work)


def add_test_delivery(
    conn: sqlite3.Connection, subscription_id: str, body: bytes, now: float
) -> Delivery | None:
    def work() -> Delivery | None:
        if not _exists(conn, subscription_id):
            return None
        cursor = conn.execute(
            "INSERT INTO deliveries (subscription_id, change_id, type, session_id, payload,"
            " status, next_attempt_at, created_at, updated_at, head)"
            " VALUES (?, NULL, 'webhook.test', NULL, ?, 'pending', ?, ?, ?, 1)",
            (subscription_id, body, now, now, now),
        )
        row = conn.execute(
            f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = ?", (cursor.lastrowid,)
        ).fetchone()
        return delivery_of(row)

    return transaction(conn, work)


def retry_delivery(conn: sqlite3.Connection, delivery_id: int, now: float) -> Delivery | None:
    def work() -> Delivery | None:
        row = conn.execute("SELECT status FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        if row is None:
            return None
        if row[0] == DeliveryStatus.DELIVERING.value:
            raise DeliveryNotRetryable(f"delivery {delivery_id} is being attempted now")
        conn.execute(
            "UPDATE deliveries SET status = 'pending', cycle_attempts = 0, next_attempt_at = ?,"
            " updated_at = ?, head = 1 WHERE id = ?",
            (now, now, delivery_id),
        )
        _reheads(conn, [delivery_id])
        found = conn.execute(
            f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = ?", (delivery_id,)
        ).fetchone()
        return delivery_of(found)

    return transaction(conn, work)


def _exists(conn: sqlite3.Connection, subscription_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM subscriptions WHERE id = ?", (subscription_id,)).fetchone()
    return row is not None


def _reheads(conn: sqlite3.Connection, delivery_ids: Sequence[int]) -> None:
    """Set the heads of the sessions of these deliveries again (older ones became active)."""
    sessions = set()
    for delivery_id in delivery_ids:
        row = conn.execute(
            "SELECT subscription_id, session_id FROM deliveries WHERE id = ?", (delivery_id,)
        ).fetchone()
        if row is not None and row[1] is not None:
            sessions.add((row[0], row[1]))
    conn.executemany(_REHEAD, sorted(sessions))


def recover_start(conn: sqlite3.Connection, subscription_id: str, since: str) -> int:
    """The id of the first change to recover from: the change after the last one caused by
    an event received before `since`, so alerts (changes of no event) fired since then
    are included. Change ids grow with event seqs: one writer applies events in order."""
    if not _exists(conn, subscription_id):
        raise KeyError(subscription_id)
    (first_seq,) = conn.execute(
        "SELECT min(seq) FROM events WHERE received_at >= ?", (since,)
    ).fetchone()
    if first_seq is None:  # no event since: only alerts (after the last event's changes)
        (first_seq,) = conn.execute("SELECT coalesce(max(seq), 0) + 1 FROM events").fetchone()
    row = conn.execute(
        "SELECT max(id) FROM changes WHERE event_seq ="
        " (SELECT max(event_seq) FROM changes WHERE event_seq < ?)",
        (first_seq,),
    ).fetchone()
    return 1 if row[0] is None else int(row[0]) + 1


def requeue_failed(
    conn: sqlite3.Connection, subscription_id: str, start: int, now: float
) -> tuple[int, bool]:
    """Queue again one page of failed deliveries of changes from `start` on."""

    def work() -> tuple[int, bool]:
        ids = [
            row[0]
            for row in conn.execute(
                "SELECT id FROM deliveries WHERE subscription_id = ? AND status = 'failed'"
                " AND change_id >= ? ORDER BY id LIMIT ?",
                (subscription_id, start, _RECOVER_PAGE),
            )
        ]
        conn.executemany(
            "UPDATE deliveries SET status = 'pending', cycle_attempts = 0, next_attempt_at = ?,"
            " updated_at = ? WHERE id = ?",
            [(now, now, delivery_id) for delivery_id in ids],
        )
        _reheads(conn, ids)
        return len(ids), len(ids) == _RECOVER_PAGE

    return transaction(conn, work)


def recover_page(
    conn: sqlite3.Connection, subscription_id: str, after: int, now: float
) -> tuple[int, int | None]:
    """Give the subscription a delivery for each change of one page after `after` that it
    has none for; return how many, and where the next page starts (None: done)."""

    def work() -> tuple[int, int | None]:
        row = conn.execute(
            "SELECT types, session_ids, format FROM subscriptions WHERE id = ?",
            (subscription_id,),
        ).fetchone()
        if row is None:  # removed meanwhile
            return 0, None
        accepts = ChangeFilter(tuple(orjson.loads(row[0])), tuple(orjson.loads(row[1])))
        page = conn.execute(
            "SELECT id, type, session_id, turn_id FROM changes WHERE id > ? ORDER BY id LIMIT ?",
            (after, _RECOVER_PAGE),
        ).fetchall()
        if not page:
            return 0, None
        before = conn.total_changes
        inserted = []
        open_keys = _Incidents(conn).open(subscription_id) if row[2] == Format.PAGERDUTY else None
        for cid, ctype, session_id, turn_id in page:
            if accepts(ctype, session_id):
                actions = None
                if open_keys is not None:
                    replayed = replay_actions(
                        incident_effect(ctype, session_id, turn_id), open_keys
                    )
                    if not replayed:
                        continue
                    actions = actions_json(replayed)
                cursor = conn.execute(
                    _INSERT_DELIVERY,
                    (subscription_id, cid, ctype, session_id, now, now, now, actions),
                )
                if cursor.rowcount:
                    inserted.append(cursor.lastrowid or 0)
        queued = conn.total_changes - before
        _reheads(conn, inserted)  # an older change may now precede a session's head
        return queued, page[-1][0] if len(page) == _RECOVER_PAGE else None

    return transaction(conn, work)
