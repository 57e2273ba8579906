"""Alert formats through dispatchers of two instances on one PostgreSQL delivery store,
to a real receiver on loopback: PagerDuty triggers and resolves, the routing key and
static headers as stored. Changes are written with plain INSERTs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest

from relay.config import DeliverySettings, StoreSettings
from relay.store.postgres_migrate import migrate_postgres
from relay.webhooks.dispatcher import Dispatcher, routing_key_binding
from relay.webhooks.formats import Format
from relay.webhooks.model import Ordering, Subscription
from relay.webhooks.secrets import SecretBox
from relay.webhooks.store import DeliveryStore, open_delivery_store
from tests.receivers import Receiver, eventually, receiver

BOX = SecretBox(bytes(range(32)))
SETTINGS = DeliverySettings(
    allow_private_networks=True, poll_interval_seconds=0.1, shutdown_grace_seconds=0
)
ROUTING_KEY = "R0UT1NGKEY0123456789abcdef012345"


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[list[DeliveryStore]]:
    """Two instances' delivery stores on one migrated database."""
    await migrate_postgres(pg_url)
    opened = [open_delivery_store(StoreSettings(url=pg_url)) for _ in range(2)]
    for store in opened:
        await store.open()
    try:
        yield opened
    finally:
        for store in opened:
            await store.close()


def pagerduty(got: Receiver, path: str) -> Subscription:
    sid = "sub_pd"
    return Subscription(
        sid,
        got.endpoint(path),
        "",
        (),
        (),
        Ordering.SESSION,
        10,
        True,
        None,
        BOX.encrypt("whsec_unused", sid),
        (),
        None,
        0,
        "2027-01-15T08:00:00Z",
        "2027-01-15T08:00:00Z",
        format=Format.PAGERDUTY,
        routing_key=BOX.encrypt(ROUTING_KEY, routing_key_binding(sid)),
        headers=(("X-Team", "agents"),),
    )


async def add_changes(url: str, changes: list[tuple[str, str, str | None]]) -> None:
    conn = await asyncpg.connect(url)
    try:
        first = await conn.fetchval("SELECT coalesce(max(id), 0) + 1 FROM changes")
        await conn.executemany(
            "INSERT INTO changes (id, type, session_id, turn_id, event_seq, body)"
            " VALUES ($1, $2, $3, $4, NULL, $5)",
            [
                (
                    cid,
                    kind,
                    session,
                    turn,
                    orjson.dumps({"id": cid, "type": kind, "session_id": session, "turn_id": turn}),
                )
                for cid, (kind, session, turn) in enumerate(changes, start=first)
            ],
        )
    finally:
        await conn.close()


async def test_pagerduty_incidents_trigger_and_resolve_through_a_cluster(
    pg_url: str, stores: list[DeliveryStore]
) -> None:
    """Two instances send a PagerDuty subscription's triggers and resolves in order, with
    the routing key decrypted and the static header; other changes send nothing."""
    async with receiver() as got:
        await stores[0].add_subscription(pagerduty(got, "/pd"))
        dispatchers = [Dispatcher(store, BOX, SETTINGS, clock=time.time) for store in stores]
        for dispatcher in dispatchers:
            await dispatcher.start()
        try:
            await add_changes(
                pg_url,
                [
                    ("session.created", "s1", None),
                    ("turn.started", "s1", "t1"),
                    ("turn.stalled", "s1", "t1"),
                    ("turn.failed", "s1", "t1"),
                    ("turn.started", "s1", "t2"),
                    ("turn.completed", "s1", "t2"),
                    ("turn.completed", "s1", "t3"),
                ],
            )
            for dispatcher in dispatchers:
                dispatcher.changes_committed()
            await eventually(lambda: len(got.at("/pd")) >= 4)
        finally:
            for dispatcher in dispatchers:
                await dispatcher.stop()
    receipts = got.at("/pd")
    stalled, failed = "relay/s1/turn/t1/stalled", "relay/s1/turn_failed"
    assert [(r.payload["event_action"], r.payload["dedup_key"]) for r in receipts] == [
        ("trigger", stalled),
        ("resolve", stalled),
        ("trigger", failed),
        ("resolve", failed),
    ]
    assert {r.payload["routing_key"] for r in receipts} == {ROUTING_KEY}
    assert {r.headers.get("x-team") for r in receipts} == {"agents"}
    assert not any("webhook-signature" in r.headers for r in receipts)
