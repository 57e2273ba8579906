"""The embedded delivery store: the webhook tables in the relay's SQLite file.

It opens a connection of its own to the file (WAL, so it reads beside the ingest
writer, and waits on `busy_timeout` when both write) and runs every statement on one
thread of its own: a batch of attempt results or claims is one transaction and one
thread hop. Changes are read from the change log, never copied. Subscriptions are kept
here; the queue's statements are in `sqlite_queue`.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson

from relay.config import StoreSettings
from relay.store.sqlite import sqlite_path
from relay.timefmt import format_time, parse_time
from relay.webhooks import sqlite_queue as queue
from relay.webhooks.formats import Format
from relay.webhooks.model import (
    Attempt,
    AttemptResult,
    ClaimedDelivery,
    Delivery,
    DeliveryStatus,
    Ordering,
    PreviousSecret,
    Subscription,
)
from relay.webhooks.store import ClaimRequest, SecretChanged
from relay.webhooks.store_rows import (
    UPDATABLE,
    headers_json,
    previous_secrets_from_json,
    previous_secrets_json,
)

T = TypeVar("T")

_SUBSCRIPTION_COLUMNS = (
    "id, url, description, types, session_ids, ordering, max_in_flight, enabled,"
    " disabled_reason, secret, previous_secrets, failing_since,"
    " start_after, created_at, updated_at, enabled_changed_at, format, routing_key, headers"
)


class SQLiteDeliveryStore:
    shared = False

    def __init__(self, settings: StoreSettings) -> None:
        self._settings = settings
        self._path = sqlite_path(settings.url)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        if self._conn is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-deliveries")
        self._conn = await self._run(self._connect)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {self._settings.synchronous}")
        conn.execute(f"PRAGMA busy_timeout = {int(self._settings.busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("the delivery store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` on the store's thread, in a transaction if it writes."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("the delivery store is not open")
        return await self._run(fn, conn, *args)

    # -- subscriptions -------------------------------------------------------------------

    async def release_claims(self, now: float) -> int:
        return await self._call(queue.release_claims, now)

    async def add_subscription(self, subscription: Subscription) -> Subscription:
        return await self._call(_add_subscription, subscription)

    async def get_subscription(self, subscription_id: str) -> Subscription | None:
        return await self._call(_get_subscription, subscription_id)

    async def list_subscriptions(self) -> list[Subscription]:
        subscriptions, _ = await self._call(_list_subscriptions, 0, -1)
        return subscriptions

    async def page_subscriptions(
        self, after: int, limit: int
    ) -> tuple[list[Subscription], int | None]:
        return await self._call(_list_subscriptions, after, limit)

    async def update_subscription(
        self, subscription_id: str, fields: Mapping[str, Any]
    ) -> Subscription | None:
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {', '.join(sorted(unknown))}")
        return await self._call(_update_subscription, subscription_id, dict(fields))

    async def rotate_secret(
        self,
        subscription_id: str,
        current: bytes,
        new: bytes,
        previous: PreviousSecret | None,
        now: float,
        updated_at: str,
    ) -> Subscription | None:
        return await self._call(
            _rotate_secret, subscription_id, current, new, previous, now, updated_at
        )

    async def delete_subscription(self, subscription_id: str) -> bool:
        return await self._call(_delete_subscription, subscription_id)

    # -- the queue -----------------------------------------------------------------------

    async def enqueue(self, limit: int, now: float) -> tuple[int, dict[str, int]]:
        return await self._call(queue.enqueue, limit, now)

    async def claim(
        self, requests: Sequence[ClaimRequest], clock: Callable[[], float], lease_seconds: float
    ) -> tuple[list[ClaimedDelivery], dict[str, float]]:
        return await self._call(queue.claim, list(requests), clock, lease_seconds)

    async def record(self, results: Sequence[AttemptResult]) -> None:
        await self._call(queue.record, list(results))

    async def add_test_delivery(
        self, subscription_id: str, body: bytes, now: float
    ) -> Delivery | None:
        return await self._call(queue.add_test_delivery, subscription_id, body, now)

    async def get_delivery(self, delivery_id: int) -> Delivery | None:
        rows = await self._call(
            queue.select,
            f"SELECT {queue.DELIVERY_COLUMNS} FROM deliveries WHERE id = ?",
            (delivery_id,),
        )
        return queue.delivery_of(rows[0]) if rows else None

    async def list_deliveries(
        self, subscription_id: str, status: DeliveryStatus | None, after: int, limit: int
    ) -> list[Delivery]:
        sql = (
            f"SELECT {queue.DELIVERY_COLUMNS} FROM deliveries WHERE subscription_id = ? AND id > ?"
        )
        params: tuple[Any, ...] = (subscription_id, after)
        if status is not None:
            sql += " AND status = ?"
            params += (status.value,)
        rows = await self._call(queue.select, sql + " ORDER BY id LIMIT ?", (*params, limit))
        return [queue.delivery_of(row) for row in rows]

    async def list_attempts(self, delivery_ids: Sequence[int]) -> dict[int, list[Attempt]]:
        found: dict[int, list[Attempt]] = {delivery_id: [] for delivery_id in delivery_ids}
        if not delivery_ids:
            return found
        marks = ",".join("?" * len(delivery_ids))
        rows = await self._call(
            queue.select,
            "SELECT delivery_id, at, status_code, latency_ms, response, error"
            f" FROM delivery_attempts WHERE delivery_id IN ({marks}) ORDER BY id",
            tuple(delivery_ids),
        )
        for row in rows:
            found[row[0]].append(Attempt(*row))
        return found

    async def retry_delivery(self, delivery_id: int, now: float) -> Delivery | None:
        return await self._call(queue.retry_delivery, delivery_id, now)

    async def recover(self, subscription_id: str, since: str, now: float) -> int:
        # The starting point is found without the write lock; then pages, each one short
        # transaction (re-running is harmless: INSERT OR IGNORE, and failed rows only).
        start = await self._call(
            queue.recover_start, subscription_id, format_time(parse_time(since))
        )
        queued = 0
        while True:
            count, more = await self._call(queue.requeue_failed, subscription_id, start, now)
            queued += count
            if not more:
                break
        after: int | None = start - 1
        while after is not None:
            count, after = await self._call(queue.recover_page, subscription_id, after, now)
            queued += count
        return queued

    async def queue_depths(self, subscription_ids: Sequence[str]) -> dict[str, int]:
        depths = dict.fromkeys(subscription_ids, 0)
        for start in range(0, len(subscription_ids), 500):
            chunk = tuple(subscription_ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = await self._call(
                queue.select,
                "SELECT subscription_id, count(*) FROM deliveries"
                f" WHERE subscription_id IN ({marks}) AND next_attempt_at IS NOT NULL"
                " GROUP BY subscription_id",
                chunk,
            )
            depths.update({sid: int(count) for sid, count in rows})
        return depths

    async def queue_depth(self) -> int:
        rows = await self._call(
            queue.select, "SELECT count(*) FROM deliveries WHERE next_attempt_at IS NOT NULL", ()
        )
        return int(rows[0][0])


# -- subscriptions, run on the store's thread ----------------------------------------------


def _subscription(row: Any) -> Subscription:
    (sid, url, description, types, sessions, ordering, max_in_flight, enabled) = row[:8]
    disabled_reason, secret, previous = row[8:11]
    return Subscription(
        sid,
        url,
        description,
        tuple(orjson.loads(types)),
        tuple(orjson.loads(sessions)),
        Ordering(ordering),
        max_in_flight,
        bool(enabled),
        disabled_reason,
        secret,
        previous_secrets_from_json(previous),
        failing_since=row[11],
        start_after=row[12],
        created_at=row[13],
        updated_at=row[14],
        enabled_changed_at=row[15],
        format=Format(row[16]),
        routing_key=row[17],
        headers=tuple((name, value) for name, value in orjson.loads(row[18])),
    )


def _rotate_secret(
    conn: sqlite3.Connection,
    subscription_id: str,
    current: bytes,
    new: bytes,
    previous: PreviousSecret | None,
    now: float,
    updated_at: str,
) -> Subscription | None:
    def work() -> Subscription | None:
        found = _get_subscription(conn, subscription_id)
        if found is None:
            return None
        if found.secret != current:
            raise SecretChanged(subscription_id)
        kept = [p for p in found.previous_secrets if p.until > now]
        if previous is not None:
            kept.append(previous)
        conn.execute(
            "UPDATE subscriptions SET secret = ?, previous_secrets = ?, updated_at = ?"
            " WHERE id = ?",
            (new, previous_secrets_json(kept), updated_at, subscription_id),
        )
        return _get_subscription(conn, subscription_id)

    return queue.transaction(conn, work)


def _get_subscription(conn: sqlite3.Connection, subscription_id: str) -> Subscription | None:
    row = conn.execute(
        f"SELECT {_SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = ?", (subscription_id,)
    ).fetchone()
    return _subscription(row) if row else None


def _list_subscriptions(
    conn: sqlite3.Connection, after: int, limit: int
) -> tuple[list[Subscription], int | None]:
    """In the order they were made, paged by rowid (a new row always gets a larger one
    than every row there is); `limit` -1: all of them."""
    rows = conn.execute(
        f"SELECT rowid, {_SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE rowid > ?"
        " ORDER BY rowid LIMIT ?",
        (after, limit),
    ).fetchall()
    next_after = rows[-1][0] if rows and len(rows) == limit else None
    return [_subscription(row[1:]) for row in rows], next_after


def _add_subscription(conn: sqlite3.Connection, s: Subscription) -> Subscription:
    def work() -> Subscription:
        conn.execute(
            f"INSERT INTO subscriptions ({_SUBSCRIPTION_COLUMNS}) VALUES"
            " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " (SELECT coalesce(max(id), 0) FROM changes), ?, ?, ?, ?, ?, ?)",
            (
                s.id,
                s.url,
                s.description,
                orjson.dumps(s.types).decode(),
                orjson.dumps(s.session_ids).decode(),
                s.ordering.value,
                s.max_in_flight,
                int(s.enabled),
                s.disabled_reason,
                s.secret,
                previous_secrets_json(s.previous_secrets),
                s.failing_since,
                s.created_at,
                s.updated_at,
                s.enabled_changed_at,
                s.format.value,
                s.routing_key,
                headers_json(s.headers),
            ),
        )
        added = _get_subscription(conn, s.id)
        assert added is not None
        # The first subscription: no delivery is owed for any change before it, so the
        # enqueuer (which idles while there are no subscriptions) need not read them.
        conn.execute(
            "UPDATE delivery_cursor SET last_change_id = max(last_change_id, ?)"
            " WHERE NOT EXISTS (SELECT 1 FROM subscriptions WHERE id != ?)",
            (added.start_after, s.id),
        )
        return added

    return queue.transaction(conn, work)


def _update_subscription(
    conn: sqlite3.Connection, subscription_id: str, fields: dict[str, Any]
) -> Subscription | None:
    for key in ("types", "session_ids"):
        if key in fields:
            fields[key] = orjson.dumps(fields[key]).decode()
    if "enabled" in fields:
        fields["enabled"] = int(fields["enabled"])
    if "ordering" in fields:
        fields["ordering"] = Ordering(fields["ordering"]).value
    if "format" in fields:
        fields["format"] = Format(fields["format"]).value
    if "headers" in fields:
        fields["headers"] = headers_json(fields["headers"])

    def work() -> Subscription | None:
        if fields:
            assignments = ", ".join(f"{key} = ?" for key in fields)
            conn.execute(
                f"UPDATE subscriptions SET {assignments} WHERE id = ?",
                (*fields.values(), subscription_id),
            )
        return _get_subscription(conn, subscription_id)

    return queue.transaction(conn, work)


def _delete_subscription(conn: sqlite3.Connection, subscription_id: str) -> bool:
    def work() -> bool:
        deleted = conn.execute("DELETE FROM subscriptions WHERE id = ?", (subscription_id,))
        return deleted.rowcount > 0

    return queue.transaction(conn, work)
