"""The cluster delivery store: the webhook tables in PostgreSQL, through an asyncpg pool.

Every instance of a cluster opens one over the same database; what may be claimed is
decided by the rows (see `relay.webhooks.postgres_queue`), never by an instance's own
copy of a subscription. The schema is `relay/store/postgres_migrations/0003_*` and
`0004_*` (alert formats).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
import orjson
import structlog

from relay.config import StoreSettings
from relay.store.postgres_writer import SERVER_SETTINGS
from relay.timefmt import format_time, parse_time
from relay.webhooks import postgres_queue as queue
from relay.webhooks.fan_out import DeliveryRow
from relay.webhooks.formats import Format, actions_json, incident_effect, replay_actions
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
from relay.webhooks.store import ClaimRequest, DeliveryNotRetryable, SecretChanged
from relay.webhooks.store_rows import (
    UPDATABLE,
    headers_json,
    previous_secrets_from_json,
    previous_secrets_json,
)

_SUBSCRIPTION_COLUMNS = (
    "id, url, description, types, session_ids, ordering, max_in_flight, enabled,"
    " disabled_reason, secret, previous_secrets, failing_since,"
    " start_after, created_at, updated_at, enabled_changed_at, format, routing_key, headers"
)
_DELIVERY_COLUMNS = (
    "id, subscription_id, change_id, type, session_id, status, attempts, cycle_attempts,"
    " next_attempt_at, last_status, last_error, created_at, updated_at"
)
_RECOVER_PAGE = 1000
POOL_SIZE = 4
LIVENESS_CHECK_SECONDS = 1.0
log = structlog.get_logger("relay.webhooks")


class PostgresDeliveryStore:
    shared = True

    def __init__(self, settings: StoreSettings, pool_size: int = POOL_SIZE) -> None:
        self._url = settings.url
        self._timeout = settings.timeout_seconds
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._alive: asyncpg.Connection | None = None
        self._keeper: asyncio.Task[None] | None = None
        # Names this instance's leases: a late result of a lease that ended and was
        # taken over elsewhere is logged, but does not move the new claim on.
        self.owner = ""

    async def open(self) -> None:
        if self._pool is not None:
            return
        # Held while this instance runs: an instance that starts releases the leases of
        # instances whose connection (so whose lock) is gone, not only ended ones.
        self._alive = await asyncpg.connect(self._url, timeout=self._timeout)
        self.owner = await queue.hold_liveness_lock(self._alive)
        self._pool = await asyncpg.create_pool(
            self._url,
            min_size=1,
            max_size=self._pool_size,
            timeout=self._timeout,
            command_timeout=self._timeout,
            server_settings=SERVER_SETTINGS,
        )
        self._keeper = asyncio.create_task(self._keep_alive(), name="relay-liveness-lock")

    async def _keep_alive(self) -> None:
        """While this instance runs, its liveness lock is held: when the connection that
        holds it is lost (PostgreSQL restarted or cut off), the lock is taken again on a
        new one, or another instance that starts would take this one's deliveries over."""
        while True:
            await asyncio.sleep(LIVENESS_CHECK_SECONDS)
            if self._alive is not None and not self._alive.is_closed():
                continue
            try:
                conn = await asyncpg.connect(self._url, timeout=self._timeout)
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                log.warning("webhooks.liveness_lock_lost", error=str(exc) or repr(exc))
                continue
            try:
                retaken = await queue.retake_liveness_lock(conn, self.owner)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                retaken = False
            if not retaken:
                await conn.close()
                continue
            self._alive = conn
            log.info("webhooks.liveness_lock_retaken", owner=self.owner)

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._alive is not None:
            await self._alive.close()
            self._alive = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the delivery store is not open")
        return self._pool

    async def release_claims(self, now: float) -> int:
        async with self.pool.acquire() as conn:
            return await queue.release_claims(conn, now)

    # -- subscriptions -------------------------------------------------------------------

    async def add_subscription(self, s: Subscription) -> Subscription:
        async with self.pool.acquire() as conn, conn.transaction():
            # The cursor's lock orders this with enqueues and other additions: a change
            # is either before this subscription's start or enqueued after it exists.
            await conn.execute("SELECT 1 FROM delivery_cursor WHERE id = 1 FOR UPDATE")
            row = await conn.fetchrow(
                f"INSERT INTO subscriptions ({_SUBSCRIPTION_COLUMNS}) VALUES ($1, $2, $3, $4,"
                " $5, $6, $7, $8, $9, $10, $11, $12,"
                " (SELECT coalesce(max(id), 0) FROM changes), $13, $14, $15, $16, $17, $18)"
                f" RETURNING {_SUBSCRIPTION_COLUMNS}",
                s.id,
                s.url,
                s.description,
                orjson.dumps(s.types).decode(),
                orjson.dumps(s.session_ids).decode(),
                s.ordering.value,
                s.max_in_flight,
                s.enabled,
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
            )
            added = _subscription(row)
            # The first subscription: no delivery is owed for any change before it.
            await conn.execute(
                "UPDATE delivery_cursor SET last_change_id = greatest(last_change_id, $1)"
                " WHERE NOT EXISTS (SELECT 1 FROM subscriptions WHERE id != $2)",
                added.start_after,
                s.id,
            )
            return added

    async def get_subscription(self, subscription_id: str) -> Subscription | None:
        row = await self.pool.fetchrow(
            f"SELECT {_SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = $1", subscription_id
        )
        return _subscription(row) if row else None

    async def list_subscriptions(self) -> list[Subscription]:
        subscriptions, _ = await self._page(0, None)
        return subscriptions

    async def page_subscriptions(
        self, after: int, limit: int
    ) -> tuple[list[Subscription], int | None]:
        return await self._page(after, limit)

    async def _page(self, after: int, limit: int | None) -> tuple[list[Subscription], int | None]:
        """In the order they were made (`seq`); `limit` None: all of them."""
        rows = await self.pool.fetch(
            f"SELECT seq, {_SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE seq > $1"
            " ORDER BY seq LIMIT $2",
            after,
            limit,
        )
        next_after = rows[-1][0] if rows and len(rows) == limit else None
        return [_subscription(row[1:]) for row in rows], next_after

    async def update_subscription(
        self, subscription_id: str, fields: Mapping[str, Any]
    ) -> Subscription | None:
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {', '.join(sorted(unknown))}")
        values = dict(fields)
        for key in ("types", "session_ids"):
            if key in values:
                values[key] = orjson.dumps(values[key]).decode()
        if "enabled" in values:
            values["enabled"] = bool(values["enabled"])
        if "ordering" in values:
            values["ordering"] = Ordering(values["ordering"]).value
        if "format" in values:
            values["format"] = Format(values["format"]).value
        if "headers" in values:
            values["headers"] = headers_json(values["headers"])
        if not values:
            return await self.get_subscription(subscription_id)
        assignments = ", ".join(f"{key} = ${n}" for n, key in enumerate(values, start=2))
        row = await self.pool.fetchrow(
            f"UPDATE subscriptions SET {assignments} WHERE id = $1"
            f" RETURNING {_SUBSCRIPTION_COLUMNS}",
            subscription_id,
            *values.values(),
        )
        return _subscription(row) if row else None

    async def rotate_secret(
        self,
        subscription_id: str,
        current: bytes,
        new: bytes,
        previous: PreviousSecret | None,
        now: float,
        updated_at: str,
    ) -> Subscription | None:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = $1 FOR UPDATE",
                subscription_id,
            )
            if row is None:
                return None
            found = _subscription(row)
            if found.secret != current:
                raise SecretChanged(subscription_id)
            kept = [p for p in found.previous_secrets if p.until > now]
            if previous is not None:
                kept.append(previous)
            row = await conn.fetchrow(
                "UPDATE subscriptions SET secret = $1, previous_secrets = $2, updated_at = $3"
                f" WHERE id = $4 RETURNING {_SUBSCRIPTION_COLUMNS}",
                new,
                previous_secrets_json(kept),
                updated_at,
                subscription_id,
            )
            return _subscription(row)

    async def delete_subscription(self, subscription_id: str) -> bool:
        result = await self.pool.execute("DELETE FROM subscriptions WHERE id = $1", subscription_id)
        return bool(result != "DELETE 0")

    # -- the queue -----------------------------------------------------------------------

    async def enqueue(self, limit: int, now: float) -> tuple[int, dict[str, int]]:
        async with self.pool.acquire() as conn:
            return await queue.enqueue(conn, limit, now)

    async def claim(
        self, requests: Sequence[ClaimRequest], clock: Callable[[], float], lease_seconds: float
    ) -> tuple[list[ClaimedDelivery], dict[str, float]]:
        async with self.pool.acquire() as conn:
            return await queue.claim(conn, requests, clock, lease_seconds, self.owner)

    async def record(self, results: Sequence[AttemptResult]) -> None:
        async with self.pool.acquire() as conn:
            await queue.record(conn, results, self.owner)

    async def add_test_delivery(
        self, subscription_id: str, body: bytes, now: float
    ) -> Delivery | None:
        row = await self.pool.fetchrow(
            "INSERT INTO deliveries (subscription_id, change_id, type, session_id, payload,"
            " status, next_attempt_at, created_at, updated_at)"
            " SELECT id, NULL, 'webhook.test', NULL, $2, 'pending', $3, $3, $3"
            f" FROM subscriptions WHERE id = $1 RETURNING {_DELIVERY_COLUMNS}",
            subscription_id,
            body,
            now,
        )
        return _delivery(row) if row else None

    async def get_delivery(self, delivery_id: int) -> Delivery | None:
        row = await self.pool.fetchrow(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE id = $1", delivery_id
        )
        return _delivery(row) if row else None

    async def list_deliveries(
        self, subscription_id: str, status: DeliveryStatus | None, after: int, limit: int
    ) -> list[Delivery]:
        rows = await self.pool.fetch(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE subscription_id = $1"
            " AND id > $2 AND ($3::text IS NULL OR status = $3) ORDER BY id LIMIT $4",
            subscription_id,
            after,
            None if status is None else status.value,
            limit,
        )
        return [_delivery(row) for row in rows]

    async def list_attempts(self, delivery_ids: Sequence[int]) -> dict[int, list[Attempt]]:
        found: dict[int, list[Attempt]] = {delivery_id: [] for delivery_id in delivery_ids}
        if not delivery_ids:
            return found
        rows = await self.pool.fetch(
            "SELECT delivery_id, at, status_code, latency_ms, response, error"
            " FROM delivery_attempts WHERE delivery_id = ANY($1::bigint[]) ORDER BY id",
            list(delivery_ids),
        )
        for row in rows:
            found[row[0]].append(Attempt(*row))
        return found

    async def retry_delivery(self, delivery_id: int, now: float) -> Delivery | None:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT status, next_attempt_at FROM deliveries WHERE id = $1 FOR UPDATE",
                delivery_id,
            )
            if row is None:
                return None
            if row[0] == DeliveryStatus.DELIVERING.value and row[1] > now:
                raise DeliveryNotRetryable(f"delivery {delivery_id} is being attempted now")
            updated = await conn.fetchrow(
                "UPDATE deliveries SET status = 'pending', cycle_attempts = 0,"
                " next_attempt_at = $2, updated_at = $2, lease_owner = NULL WHERE id = $1"
                f" RETURNING {_DELIVERY_COLUMNS}",
                delivery_id,
                now,
            )
            return _delivery(updated)

    async def recover(self, subscription_id: str, since: str, now: float) -> int:
        # Pages, each one short transaction (re-running is harmless: ON CONFLICT DO
        # NOTHING, and failed rows only).
        start = await self._recover_start(subscription_id, format_time(parse_time(since)))
        queued = 0
        while True:
            rows = await self.pool.fetch(
                "UPDATE deliveries SET status = 'pending', cycle_attempts = 0,"
                " next_attempt_at = $3, updated_at = $3 WHERE id IN (SELECT id FROM deliveries"
                " WHERE subscription_id = $1 AND status = 'failed' AND change_id >= $2"
                " ORDER BY id LIMIT $4) RETURNING id",
                subscription_id,
                start,
                now,
                _RECOVER_PAGE,
            )
            queued += len(rows)
            if len(rows) < _RECOVER_PAGE:
                break
        after: int | None = start - 1
        while after is not None:
            count, after = await self._recover_page(subscription_id, after, now)
            queued += count
        return queued

    async def _recover_start(self, subscription_id: str, since: str) -> int:
        """The first change to recover from: the one after the last change caused by an
        event received before `since` (so alerts fired since then are included)."""
        if await self.get_subscription(subscription_id) is None:
            raise KeyError(subscription_id)
        first_seq = await self.pool.fetchval(
            "SELECT coalesce((SELECT min(seq) FROM events WHERE received_at >= $1),"
            " (SELECT coalesce(max(seq), 0) + 1 FROM events))",
            since,
        )
        last = await self.pool.fetchval(
            "SELECT max(id) FROM changes WHERE event_seq ="
            " (SELECT max(event_seq) FROM changes WHERE event_seq < $1)",
            first_seq,
        )
        return 1 if last is None else int(last) + 1

    async def _recover_page(
        self, subscription_id: str, after: int, now: float
    ) -> tuple[int, int | None]:
        """Give the subscription a delivery for each change of one page after `after`
        that it has none for; return how many, and where the next page starts."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT types, session_ids, format FROM subscriptions WHERE id = $1",
                subscription_id,
            )
            if row is None:  # removed meanwhile
                return 0, None
            accepts = queue.change_filter(row[0], row[1])
            page = await conn.fetch(
                "SELECT id, type, session_id, turn_id FROM changes WHERE id > $1 ORDER BY id"
                " LIMIT $2",
                after,
                _RECOVER_PAGE,
            )
            if not page:
                return 0, None
            open_keys = None
            if row[2] == Format.PAGERDUTY:
                open_keys = await queue.Incidents(conn).open(subscription_id)
            rows: list[DeliveryRow] = []
            for cid, ctype, session_id, turn_id in page:
                if not accepts(ctype, session_id):
                    continue
                actions = None
                if open_keys is not None:
                    # What brings the receiver to the incidents open now.
                    effect = incident_effect(ctype, session_id, turn_id)
                    replayed = replay_actions(effect, open_keys)
                    if not replayed:
                        continue
                    actions = actions_json(replayed)
                rows.append((subscription_id, cid, ctype, session_id, actions))
            queued = await queue.insert_deliveries(conn, rows, now)
            return queued, page[-1][0] if len(page) == _RECOVER_PAGE else None

    async def queue_depths(self, subscription_ids: Sequence[str]) -> dict[str, int]:
        depths = dict.fromkeys(subscription_ids, 0)
        rows = await self.pool.fetch(
            "SELECT subscription_id, count(*) FROM deliveries"
            " WHERE subscription_id = ANY($1::text[]) AND next_attempt_at IS NOT NULL"
            " GROUP BY subscription_id",
            list(subscription_ids),
        )
        depths.update({row[0]: int(row[1]) for row in rows})
        return depths

    async def queue_depth(self) -> int:
        count = await self.pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE next_attempt_at IS NOT NULL"
        )
        return int(count)


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
        bytes(secret),
        previous_secrets_from_json(previous),
        failing_since=row[11],
        start_after=row[12],
        created_at=row[13],
        updated_at=row[14],
        enabled_changed_at=row[15],
        format=Format(row[16]),
        routing_key=None if row[17] is None else bytes(row[17]),
        headers=tuple((name, value) for name, value in orjson.loads(row[18])),
    )


def _delivery(row: Any) -> Delivery:
    return Delivery(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        DeliveryStatus(row[5]),
        *row[6:],
    )
