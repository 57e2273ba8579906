"""The PostgreSQL delivery queue: enqueue, claim and record, shared by every instance.

The rows decide. A claim locks the subscription's row (so claims for one subscription
take turns across instances), skips it unless it is enabled, counts the deliveries
leased on every instance against `max_in_flight`, and takes due rows `FOR UPDATE SKIP
LOCKED`. A delivering row is leased to one instance until its `next_attempt_at`; after
that it is due like any other, so a dead instance's deliveries are taken over once its
leases end. Session order is read from the rows at claim time: a delivery may go only if
no older one of its session is active, wherever that one is. The enqueue cursor is one
row, locked while changes are turned into deliveries, so each change is enqueued once;
a PagerDuty subscription's open incidents are updated in that same transaction, so they
are kept in change order whichever instance enqueues.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import asyncpg
import orjson

from relay.changes import RAW_EVENT_COLUMNS
from relay.timefmt import format_unix
from relay.webhooks.fan_out import DeliveryRow, fan_out, incidents_needed
from relay.webhooks.model import AttemptResult, ChangeFilter, ClaimedDelivery, DeliveryStatus
from relay.webhooks.store import ClaimRequest
from relay.webhooks.store_rows import attempt_args, claimed_delivery, result_args

# No older delivery of the same subscription and session is active (a test event, which
# has no session, always may go).
_HEAD = (
    "(d.session_id IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries e"
    " WHERE e.subscription_id = d.subscription_id AND e.session_id = d.session_id"
    " AND e.change_id < d.change_id AND e.next_attempt_at IS NOT NULL))"
)
_CLAIM_ANY = (
    "SELECT d.id FROM deliveries d WHERE d.subscription_id = $1 AND d.next_attempt_at <= $2"
    " ORDER BY d.next_attempt_at, d.id LIMIT $3 FOR UPDATE SKIP LOCKED"
)
_CLAIM_SESSION_ORDERED = (
    "SELECT d.id FROM deliveries d WHERE d.subscription_id = $1 AND d.next_attempt_at <= $2"
    f" AND {_HEAD} ORDER BY d.next_attempt_at, d.id LIMIT $3 FOR UPDATE OF d SKIP LOCKED"
)
# Deliveries leased now, on any instance.
_IN_FLIGHT = (
    "SELECT count(*) FROM deliveries"
    " WHERE subscription_id = $1 AND status = 'delivering' AND next_attempt_at > $2"
)
# When the subscription's next delivery is due; another instance's lease counts as due
# when it ends (it is taken over then, if that instance is gone), this one's does not.
_NEXT_DUE_ANY = (
    "SELECT min(d.next_attempt_at) FROM deliveries d WHERE d.subscription_id = $1"
    " AND d.next_attempt_at IS NOT NULL"
    " AND (d.status != 'delivering' OR d.lease_owner IS DISTINCT FROM $2)"
)
_NEXT_DUE_SESSION_ORDERED = _NEXT_DUE_ANY + f" AND {_HEAD}"
_CLAIMED_BODIES = (
    "SELECT d.id, d.change_id, d.type, coalesce(d.payload, c.body), d.cycle_attempts,"
    f" d.alert_actions, {RAW_EVENT_COLUMNS}"
    " FROM deliveries d LEFT JOIN changes c ON c.id = d.change_id"
    " LEFT JOIN events e ON c.body = ''::bytea AND e.seq = c.event_seq"
    " WHERE d.id = ANY($1::bigint[])"
)
# Only while this instance still holds the lease: a result that comes after the lease
# ended and another instance claimed the delivery must not move that claim on.
_RECORD_DELIVERY = (
    "UPDATE deliveries SET status = $1, attempts = attempts + 1, cycle_attempts = $2,"
    " next_attempt_at = $3, last_status = $4, last_error = $5, updated_at = $6,"
    " lease_owner = NULL WHERE id = $7 AND status = 'delivering' AND lease_owner = $8"
)
_RECORD_ATTEMPT = (
    "INSERT INTO delivery_attempts (delivery_id, at, status_code, latency_ms, response, error)"
    " SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM deliveries WHERE id = $1)"
)
INSERT_DELIVERIES = (
    "INSERT INTO deliveries (subscription_id, change_id, type, session_id, status,"
    " next_attempt_at, created_at, updated_at, alert_actions)"
    " SELECT u.s, u.c, u.t, u.ss, 'pending', $6, $6, $6, u.a"
    " FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[])"
    " AS u(s, c, t, ss, a)"
    " ON CONFLICT (subscription_id, change_id) DO NOTHING RETURNING id"
)


def change_filter(types: str, session_ids: str) -> ChangeFilter:
    """A subscription's filter from its JSON columns."""
    return ChangeFilter(tuple(orjson.loads(types)), tuple(orjson.loads(session_ids)))


class Incidents:
    """The open PagerDuty incidents of subscriptions, read when first needed and written
    back (what was resolved removed, what was triggered added) in the same transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._read: dict[str, dict[str, int]] = {}
        self._before: dict[str, dict[str, int]] = {}

    async def open(self, subscription_id: str) -> dict[str, int]:
        found = self._read.get(subscription_id)
        if found is None:
            rows = await self._conn.fetch(
                "SELECT dedup_key, change_id FROM alert_incidents WHERE subscription_id = $1",
                subscription_id,
            )
            found = {row[0]: row[1] for row in rows}
            self._read[subscription_id] = found
            self._before[subscription_id] = dict(found)
        return found

    async def write(self) -> None:
        gone, opened = [], []
        for sid, keys in sorted(self._read.items()):
            before = self._before[sid]
            gone += [(sid, key) for key in sorted(before.keys() - keys.keys())]
            opened += [(sid, key, cid) for key, cid in keys.items() if before.get(key) != cid]
        await self._conn.executemany(
            "DELETE FROM alert_incidents WHERE subscription_id = $1 AND dedup_key = $2", gone
        )
        await self._conn.executemany(
            "INSERT INTO alert_incidents (subscription_id, dedup_key, change_id)"
            " VALUES ($1, $2, $3) ON CONFLICT (subscription_id, dedup_key)"
            " DO UPDATE SET change_id = excluded.change_id",
            opened,
        )


async def insert_deliveries(
    conn: asyncpg.Connection, rows: Sequence[DeliveryRow], now: float
) -> int:
    """Add pending deliveries (subscription, change id, type, session, alert actions),
    skipping those that exist; return how many were added."""
    if not rows:
        return 0
    columns = [list(column) for column in zip(*rows, strict=True)]
    added = await conn.fetch(INSERT_DELIVERIES, *columns, now)
    return len(added)


async def enqueue(conn: asyncpg.Connection, limit: int, now: float) -> tuple[int, dict[str, int]]:
    """Turn up to `limit` changes after the shared cursor into deliveries and move it."""
    async with conn.transaction():
        # Another instance enqueuing holds the row; this one then reads where it ended.
        cursor = await conn.fetchval(
            "SELECT last_change_id FROM delivery_cursor WHERE id = 1 FOR UPDATE"
        )
        changes = await conn.fetch(
            "SELECT id, type, session_id, turn_id FROM changes WHERE id > $1 ORDER BY id LIMIT $2",
            cursor,
            limit,
        )
        if not changes:
            return 0, {}
        # Disabled ones too: their deliveries wait, and go once they are enabled. KEY
        # SHARE: a subscription removed meanwhile is either gone here or removed after.
        subscriptions = [
            (row[0], change_filter(row[1], row[2]), row[3], row[4])
            for row in await conn.fetch(
                "SELECT id, types, session_ids, start_after, format FROM subscriptions"
                " ORDER BY id FOR KEY SHARE"
            )
        ]
        incidents = Incidents(conn)
        needed = {
            sid: await incidents.open(sid) for sid in incidents_needed(changes, subscriptions)
        }
        rows, counts = fan_out(changes, subscriptions, needed)
        await insert_deliveries(conn, rows, now)
        await incidents.write()
        await conn.execute(
            "UPDATE delivery_cursor SET last_change_id = $1 WHERE id = 1", changes[-1][0]
        )
        return len(changes), counts


async def claim(
    conn: asyncpg.Connection,
    requests: Sequence[ClaimRequest],
    clock: Callable[[], float],
    lease_seconds: float,
    owner: str,
) -> tuple[list[ClaimedDelivery], dict[str, float]]:
    """Lease due deliveries to `owner`; see the module's docstring for the rules."""
    async with conn.transaction():
        now = clock()  # read when the claim runs, not when it was asked for
        claimed: list[ClaimedDelivery] = []
        next_due: dict[str, float] = {}
        # Subscription rows are locked in id order, as `record` does: no deadlock.
        for request in sorted(requests, key=lambda r: r.subscription_id):
            sid = request.subscription_id
            max_in_flight = await conn.fetchval(
                "SELECT max_in_flight FROM subscriptions WHERE id = $1 AND enabled"
                " FOR NO KEY UPDATE",
                sid,
            )
            if max_in_flight is None:  # removed, or disabled (by any instance)
                continue
            in_flight = await conn.fetchval(_IN_FLIGHT, sid, now)
            limit = min(request.limit, max_in_flight - in_flight)
            if limit > 0:
                claimed += await _lease(conn, request, now, limit, now + lease_seconds, owner)
            sql = _NEXT_DUE_SESSION_ORDERED if request.session_ordered else _NEXT_DUE_ANY
            due = await conn.fetchval(sql, sid, owner)
            if due is not None:
                next_due[sid] = due
        return claimed, next_due


async def _lease(
    conn: asyncpg.Connection,
    request: ClaimRequest,
    now: float,
    limit: int,
    lease_until: float,
    owner: str,
) -> list[ClaimedDelivery]:
    sql = _CLAIM_SESSION_ORDERED if request.session_ordered else _CLAIM_ANY
    ids = [row[0] for row in await conn.fetch(sql, request.subscription_id, now, limit)]
    if not ids:
        return []
    await conn.execute(
        "UPDATE deliveries SET status = 'delivering', next_attempt_at = $2, lease_owner = $3"
        " WHERE id = ANY($1::bigint[])",
        ids,
        lease_until,
        owner,
    )
    bodies = {row[0]: row for row in await conn.fetch(_CLAIMED_BODIES, ids)}
    return [claimed_delivery(request.subscription_id, bodies[i]) for i in ids]


async def record(conn: asyncpg.Connection, results: Sequence[AttemptResult], owner: str) -> None:
    """Log the attempts and move each delivery (and subscription) on, in one transaction."""
    async with conn.transaction():
        last: dict[str, AttemptResult] = {}
        for result in results:
            last[result.subscription_id] = result
        await conn.execute(
            "SELECT 1 FROM subscriptions WHERE id = ANY($1::text[]) ORDER BY id FOR NO KEY UPDATE",
            sorted(last),
        )
        await conn.executemany(_RECORD_DELIVERY, [(*result_args(r), owner) for r in results])
        await conn.executemany(_RECORD_ATTEMPT, [attempt_args(r) for r in results])
        for sid, result in sorted(last.items()):
            if result.status is DeliveryStatus.DELIVERED:
                await conn.execute(
                    "UPDATE subscriptions SET failing_since = NULL"
                    " WHERE id = $1 AND failing_since IS NOT NULL",
                    sid,
                )
            else:  # an enable through the API after this attempt started the count afresh
                await conn.execute(
                    "UPDATE subscriptions SET failing_since = $1"
                    " WHERE id = $2 AND failing_since IS NULL"
                    " AND coalesce(enabled_changed_at, 0) < $1",
                    result.attempt.at,
                    sid,
                )
        for result in results:
            if result.disable_reason is not None:
                # Unless `enabled` was set through the API after the attempt decided it.
                await conn.execute(
                    "UPDATE subscriptions SET enabled = false, disabled_reason = $1,"
                    " updated_at = greatest(updated_at, $2)"
                    " WHERE id = $3 AND enabled AND coalesce(enabled_changed_at, 0) < $4",
                    result.disable_reason,
                    format_unix(result.attempt.at),
                    result.subscription_id,
                    result.attempt.at,
                )


# The instances alive now: each holds the advisory lock (LIVENESS_LOCK, its key) on a
# connection of its own for as long as it runs; PostgreSQL drops it when that ends.
LIVENESS_LOCK = 0x72656C61
_LIVE_OWNERS = (
    "SELECT objid::bigint::text FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND classid::bigint = $2 AND objsubid = 2"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


async def release_claims(conn: asyncpg.Connection, now: float) -> int:
    """Make deliveries due now, as pending or retrying again, whose lease has ended or
    whose instance is gone (its liveness lock is free): the others may be attempted
    elsewhere right now."""
    async with conn.transaction():
        result = await conn.execute(
            "UPDATE deliveries SET next_attempt_at = $1, lease_owner = NULL,"
            " status = CASE WHEN cycle_attempts > 0 THEN 'retrying' ELSE 'pending' END"
            " WHERE status = 'delivering' AND (next_attempt_at <= $1 OR lease_owner IS NULL"
            f" OR lease_owner NOT IN ({_LIVE_OWNERS}))",
            now,
            LIVENESS_LOCK,
        )
    return int(result.split()[-1])


async def hold_liveness_lock(conn: asyncpg.Connection) -> str:
    """Take a liveness lock no other instance holds, on `conn`; return its key (the
    instance's lease owner name)."""
    while True:
        key = secrets.randbelow(2**31)
        if await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LIVENESS_LOCK, key):
            return str(key)


async def retake_liveness_lock(conn: asyncpg.Connection, owner: str) -> bool:
    """Take this instance's liveness lock again, on a new connection (the one that held
    it was lost); false if another session holds it."""
    taken: bool = await conn.fetchval(
        "SELECT pg_try_advisory_lock($1, $2)", LIVENESS_LOCK, int(owner)
    )
    return taken
