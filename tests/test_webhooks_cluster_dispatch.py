"""Dispatchers of several instances on one PostgreSQL delivery store, delivering to a
real receiver on loopback. Changes are written with plain INSERTs (the store under test
only reads them); an instance that dies is a store whose connections are gone."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import orjson
import pytest

from relay.config import DeliverySettings, StoreSettings
from relay.store.postgres_migrate import migrate_postgres
from relay.webhooks.dispatcher import LEASE_MARGIN_SECONDS, Dispatcher
from relay.webhooks.model import Ordering, Subscription
from relay.webhooks.secrets import SecretBox, new_webhook_secret
from relay.webhooks.store import ClaimRequest, DeliveryStore, open_delivery_store
from tests.receivers import Receiver, eventually, receiver

BOX = SecretBox(bytes(range(32)))
SETTINGS = DeliverySettings(
    allow_private_networks=True, poll_interval_seconds=0.1, shutdown_grace_seconds=0
)
LEASE = SETTINGS.timeout_seconds + LEASE_MARGIN_SECONDS


@dataclass
class Clock:
    """The wall clock, moved on by `offset` (a lease ends without waiting for it)."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Cluster:
    url: str
    got: Receiver
    stores: list[DeliveryStore]
    dispatchers: list[Dispatcher]

    async def instance(self) -> DeliveryStore:
        store = open_delivery_store(StoreSettings(url=self.url))
        await store.open()
        self.stores.append(store)
        return store

    async def dispatcher(self, clock: Clock) -> Dispatcher:
        dispatcher = Dispatcher(await self.instance(), BOX, SETTINGS, clock=clock)
        await dispatcher.start()
        self.dispatchers.append(dispatcher)
        return dispatcher

    async def subscribe(self, store: DeliveryStore, path: str, max_in_flight: int) -> None:
        secret = new_webhook_secret()
        self.got.secrets[path] = secret
        await store.add_subscription(
            Subscription(
                "sub_" + path.strip("/"),
                self.got.endpoint(path),
                "",
                (),
                (),
                Ordering.SESSION,
                max_in_flight,
                True,
                None,
                BOX.encrypt(secret, "sub_" + path.strip("/")),
                (),
                None,
                0,
                "2027-01-15T08:00:00Z",
                "2027-01-15T08:00:00Z",
            )
        )

    async def add_changes(self, sessions: list[str]) -> list[int]:
        conn = await asyncpg.connect(self.url)
        try:
            return await self._insert_changes(conn, sessions)
        finally:
            await conn.close()

    async def _insert_changes(self, conn: asyncpg.Connection, sessions: list[str]) -> list[int]:
        first = await conn.fetchval("SELECT coalesce(max(id), 0) + 1 FROM changes")
        ids = list(range(first, first + len(sessions)))
        await conn.executemany(
            "INSERT INTO changes (id, type, session_id, turn_id, event_seq, body)"
            " VALUES ($1, 'turn.started', $2, NULL, NULL, $3)",
            [
                (cid, session, orjson.dumps({"id": cid, "session_id": session}))
                for cid, session in zip(ids, sessions, strict=True)
            ],
        )
        return ids

    async def queue_elsewhere(self, sessions: list[str], now: float) -> list[int]:
        """Append changes and queue their deliveries in one transaction, as another
        instance's ingest and enqueue would leave them (no dispatcher here sees it)."""
        conn = await asyncpg.connect(self.url)
        try:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM delivery_cursor FOR UPDATE")
                ids = await self._insert_changes(conn, sessions)
                await conn.executemany(
                    "INSERT INTO deliveries (subscription_id, change_id, type, session_id,"
                    " status, next_attempt_at, created_at, updated_at)"
                    " VALUES ('sub_hook', $1, 'turn.started', $2, 'pending', $3, $3, $3)",
                    [(cid, session, now) for cid, session in zip(ids, sessions, strict=True)],
                )
                await conn.execute("UPDATE delivery_cursor SET last_change_id = $1", ids[-1])
        finally:
            await conn.close()
        return ids


@pytest.fixture
async def cluster(pg_url: str) -> AsyncIterator[Cluster]:
    await migrate_postgres(pg_url)
    async with receiver() as got:
        found = Cluster(pg_url, got, [], [])
        try:
            yield found
        finally:
            for dispatcher in found.dispatchers:
                await dispatcher.stop()
            for store in found.stores:
                await store.close()


async def test_two_dispatchers_deliver_every_change_once_in_session_order(
    cluster: Cluster,
) -> None:
    """Two instances' dispatchers deliver each change once, each session in id order."""
    first = await cluster.dispatcher(Clock())
    second = await cluster.dispatcher(Clock())
    await cluster.subscribe(cluster.stores[0], "/hook", max_in_flight=3)
    await first.refresh()
    await second.refresh()
    ids = await cluster.add_changes([f"chat_{n % 5}" for n in range(60)])
    first.changes_committed()
    second.changes_committed()
    await eventually(lambda: len(cluster.got.at("/hook")) >= len(ids))
    receipts = cluster.got.at("/hook")
    assert all(r.verified for r in receipts)
    assert sorted(r.change_id for r in receipts) == ids  # each once
    by_session: dict[str, list[int]] = {}
    for r in receipts:
        by_session.setdefault(r.payload["data"]["session_id"], []).append(r.change_id)
    assert all(seen == sorted(seen) for seen in by_session.values())


async def test_a_dead_instances_deliveries_are_made_by_another_after_the_lease(
    cluster: Cluster,
) -> None:
    """What a dead instance had claimed is delivered by a running one once the lease ends."""
    clock = Clock()
    dead = await cluster.instance()
    await cluster.subscribe(dead, "/hook", max_in_flight=10)
    ids = await cluster.add_changes(["chat_1", "chat_2"])
    await dead.enqueue(100, clock())
    claimed, _ = await dead.claim([ClaimRequest("sub_hook", 10, True)], clock, LEASE)
    assert len(claimed) == 2
    running = await cluster.dispatcher(clock)  # starts while the other still runs
    await dead.close()  # dies with its deliveries claimed
    await running.refresh()
    clock.offset = LEASE + 1
    await eventually(lambda: len(cluster.got.at("/hook")) == 2)
    assert sorted(r.change_id for r in cluster.got.at("/hook")) == ids


async def test_an_instance_that_starts_takes_over_a_dead_instances_claims_at_once(
    cluster: Cluster,
) -> None:
    """An instance starting after another died delivers its claimed deliveries at once."""
    clock = Clock()
    dead = await cluster.instance()
    await cluster.subscribe(dead, "/hook", max_in_flight=10)
    ids = await cluster.add_changes(["chat_1"])
    await dead.enqueue(100, clock())
    claimed, _ = await dead.claim([ClaimRequest("sub_hook", 10, True)], clock, LEASE)
    assert len(claimed) == 1
    await dead.close()
    await cluster.dispatcher(clock)
    await eventually(lambda: len(cluster.got.at("/hook")) == 1)
    assert [r.change_id for r in cluster.got.at("/hook")] == ids


async def test_deliveries_another_instance_queued_are_delivered_by_a_running_one(
    cluster: Cluster,
) -> None:
    """Deliveries another instance queued (and died before claiming) reach the receiver
    through an instance that was already running and had nothing to do."""
    clock = Clock()
    await cluster.subscribe(await cluster.instance(), "/hook", max_in_flight=10)
    await cluster.dispatcher(clock)
    ids = await cluster.queue_elsewhere(["chat_1", "chat_2"], clock())
    await eventually(lambda: len(cluster.got.at("/hook")) == 2)
    assert sorted(r.change_id for r in cluster.got.at("/hook")) == ids
