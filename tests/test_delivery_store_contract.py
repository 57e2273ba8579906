"""The delivery store contract, run against the embedded (SQLite) and cluster
(PostgreSQL) backends: the same tests, the same answers. Changes and events are written
with plain INSERTs: the store under test only reads them."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from relay.config import AlertSettings, StoreSettings
from relay.store.postgres_migrate import migrate_postgres
from relay.store.sqlite import SQLiteStore
from relay.webhooks.dispatcher import routing_key_binding
from relay.webhooks.formats import Action, AlertAction, Format, decide_actions, incident_effect
from relay.webhooks.model import (
    Attempt,
    AttemptResult,
    ClaimedDelivery,
    DeliveryStatus,
    Ordering,
    PreviousSecret,
    Subscription,
)
from relay.webhooks.secrets import SecretBox
from relay.webhooks.store import (
    ClaimRequest,
    DeliveryNotRetryable,
    DeliveryStore,
    SecretChanged,
    open_delivery_store,
)

T0 = 1_800_000_000.0
LEASE = 30.0


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """A delivery store on a fresh schema, and plain writes into the change log."""

    name: str
    store: DeliveryStore
    settings: StoreSettings
    _next_seq: int = 0
    _next_change: int = 0
    stores: list[DeliveryStore] = field(default_factory=list)

    async def sql(self, statement: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Run one statement per row, in the backend's own dialect (`?` placeholders)."""
        if self.name == "sqlite":  # the URL says which
            path = self.settings.url.removeprefix("sqlite:///")
            with sqlite3.connect(path) as conn:
                conn.executemany(statement, rows)
            return
        numbered = statement
        for n in range(1, statement.count("?") + 1):
            numbered = numbered.replace("?", f"${n}", 1)
        conn = await asyncpg.connect(self.settings.url)
        try:
            await conn.executemany(numbered, rows)
        finally:
            await conn.close()

    async def add_event(self, event_type: str, session_id: str, received_at: str) -> int:
        self._next_seq += 1
        await self.sql(
            "INSERT INTO events (seq, source, event_id, type, session_id, turn_id,"
            " occurred_at, received_at, payload) VALUES (?, 'src', ?, ?, ?, NULL, ?, ?, ?)",
            [
                (
                    self._next_seq,
                    f"evt_{self._next_seq}",
                    event_type,
                    session_id,
                    received_at,
                    received_at,
                    b'{"raw":true}',
                )
            ],
        )
        return self._next_seq

    async def add_changes(
        self,
        changes: Sequence[tuple[str, str] | tuple[str, str, str]],
        event_seq: int | None = None,
    ) -> list[int]:
        """Append (type, session id[, turn id]) changes; return their ids."""
        rows = []
        for change_type, session_id, *turn in changes:
            self._next_change += 1
            body = orjson.dumps({"id": self._next_change, "type": change_type})
            turn_id = turn[0] if turn else None
            rows.append((self._next_change, change_type, session_id, turn_id, event_seq, body))
        await self.sql(
            "INSERT INTO changes (id, type, session_id, turn_id, event_seq, body)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        return [row[0] for row in rows]

    async def add_raw_change(self, event_seq: int, session_id: str) -> int:
        """A raw change, its body rebuilt from its event."""
        self._next_change += 1
        await self.sql(
            "INSERT INTO changes (id, type, session_id, turn_id, event_seq, body)"
            " VALUES (?, 'raw.agent.ping', ?, NULL, ?, ?)",
            [(self._next_change, session_id, event_seq, b"")],
        )
        return self._next_change

    async def another_instance(self) -> DeliveryStore:
        """A second store on the same database (another instance, another pool)."""
        store = open_delivery_store(self.settings)
        await store.open()
        self.stores.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty store: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/relay.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def backend(store_url: str) -> AsyncIterator[Backend]:
    async with opened_backend(store_url) as found:
        yield found


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[Backend]:
    """PostgreSQL only: a backend that can open other instances on its database."""
    async with opened_backend(pg_url) as found:
        yield found


@contextlib.asynccontextmanager
async def opened_backend(store_url: str) -> AsyncIterator[Backend]:
    if store_url.startswith("sqlite"):
        settings = StoreSettings(url=store_url, writer="thread")
        main = SQLiteStore(settings, {}, AlertSettings())
        await main.migrate()
        await main.close()
    else:
        settings = StoreSettings(url=store_url)
        await migrate_postgres(store_url)
    store = open_delivery_store(settings)
    await store.open()
    found = Backend(store_url.partition(":")[0], store, settings, stores=[store])
    try:
        yield found
    finally:
        for opened in found.stores:
            await opened.close()


def subscription(
    sid: str,
    types: tuple[str, ...] = (),
    session_ids: tuple[str, ...] = (),
    ordering: Ordering = Ordering.NONE,
    max_in_flight: int = 10,
) -> Subscription:
    return Subscription(
        sid,
        f"https://example.com/{sid}",
        "",
        types,
        session_ids,
        ordering,
        max_in_flight,
        True,
        None,
        b"secret-" + sid.encode(),
        (),
        None,
        0,
        "2027-01-15T08:00:00Z",
        "2027-01-15T08:00:00Z",
    )


def result(
    delivery: ClaimedDelivery,
    at: float,
    status: DeliveryStatus,
    next_attempt_at: float | None = None,
    code: int | None = 200,
    disable_reason: str | None = None,
) -> AttemptResult:
    return AttemptResult(
        Attempt(delivery.id, at, code, 12.5, "ok", None),
        delivery.subscription_id,
        status,
        delivery.cycle_attempts + 1,
        next_attempt_at,
        disable_reason,
    )


async def claim_all(
    store: DeliveryStore,
    sid: str,
    clock: Clock,
    limit: int = 100,
    ordered: bool = False,
) -> list[ClaimedDelivery]:
    claimed, _ = await store.claim([ClaimRequest(sid, limit, ordered)], clock, LEASE)
    return claimed


async def deliver(store: DeliveryStore, claimed: Sequence[ClaimedDelivery], at: float) -> None:
    await store.record([result(d, at, DeliveryStatus.DELIVERED) for d in claimed])


# -- subscriptions ----------------------------------------------------------------------


async def test_subscriptions_are_stored_listed_paged_updated_and_deleted(
    backend: Backend,
) -> None:
    """Subscriptions come back as stored, oldest first, in pages, with updates applied."""
    store = backend.store
    for sid in ("sub_a", "sub_b", "sub_c"):
        await store.add_subscription(subscription(sid, types=("turn.*",)))
    got = await store.get_subscription("sub_b")
    assert got is not None
    assert got.types == ("turn.*",)
    assert got.secret == b"secret-sub_b"
    assert [s.id for s in await store.list_subscriptions()] == ["sub_a", "sub_b", "sub_c"]
    first, cursor = await store.page_subscriptions(0, 2)
    assert [s.id for s in first] == ["sub_a", "sub_b"]
    assert cursor is not None
    rest, end = await store.page_subscriptions(cursor, 2)
    assert [s.id for s in rest] == ["sub_c"]
    assert end is None
    updated = await store.update_subscription(
        "sub_a", {"enabled": False, "session_ids": ["chat_*"], "ordering": "session"}
    )
    assert updated is not None
    assert not updated.enabled
    assert updated.session_ids == ("chat_*",)
    assert updated.ordering is Ordering.SESSION
    assert await store.update_subscription("nope", {"enabled": True}) is None
    with pytest.raises(ValueError, match="not updatable"):
        await store.update_subscription("sub_a", {"secret": b"x"})
    assert await store.delete_subscription("sub_b") is True
    assert await store.delete_subscription("sub_b") is False
    assert await store.get_subscription("sub_b") is None


async def test_a_new_subscription_receives_only_changes_after_it(backend: Backend) -> None:
    """A subscription starts after the newest change in the log."""
    await backend.add_changes([("turn.started", "s1"), ("turn.completed", "s1")])
    added = await backend.store.add_subscription(subscription("sub_a"))
    assert added.start_after == 2
    assert await backend.store.enqueue(100, T0) == (0, {})
    await backend.add_changes([("turn.failed", "s1")])
    assert await backend.store.enqueue(100, T0) == (1, {"sub_a": 1})


async def test_rotate_secret_keeps_the_previous_one_until_it_ends(backend: Backend) -> None:
    """A rotation swaps the secret, keeps unexpired previous ones, and refuses a stale start."""
    store = backend.store
    await store.add_subscription(subscription("sub_a"))
    first = PreviousSecret(b"old-1", T0 + 10)
    rotated = await store.rotate_secret("sub_a", b"secret-sub_a", b"new-1", first, T0, "t1")
    assert rotated is not None
    assert rotated.secret == b"new-1"
    assert rotated.previous_secrets == (first,)
    assert rotated.updated_at == "t1"
    second = PreviousSecret(b"old-2", T0 + 100)
    again = await store.rotate_secret("sub_a", b"new-1", b"new-2", second, T0 + 20, "t2")
    assert again is not None
    assert again.previous_secrets == (second,)
    with pytest.raises(SecretChanged):
        await store.rotate_secret("sub_a", b"new-1", b"new-3", None, T0 + 30, "t3")
    assert await store.rotate_secret("nope", b"a", b"b", None, T0, "t4") is None


# -- the queue ---------------------------------------------------------------------------


async def test_enqueue_gives_each_subscription_the_changes_its_filter_accepts(
    backend: Backend,
) -> None:
    """Each change becomes one delivery per subscription whose filter accepts it."""
    store = backend.store
    await store.add_subscription(subscription("all"))
    await store.add_subscription(subscription("turns", types=("turn.*",)))
    await store.add_subscription(subscription("chat1", session_ids=("chat_1",)))
    await store.add_subscription(subscription("raw", types=("raw.*",)))
    seq = await backend.add_event("agent.ping", "chat_2", "2027-01-15T08:00:00Z")
    await backend.add_changes(
        [("session.created", "chat_1"), ("turn.started", "chat_1"), ("turn.started", "chat_2")]
    )
    await backend.add_raw_change(seq, "chat_2")
    read, counts = await store.enqueue(100, T0)
    assert read == 4
    assert counts == {"all": 3, "turns": 2, "chat1": 2, "raw": 1}
    assert await store.enqueue(100, T0) == (0, {})
    assert await store.queue_depth() == 8
    rows = await store.list_deliveries("turns", None, 0, 10)
    assert [(d.type, d.session_id, d.status) for d in rows] == [
        ("turn.started", "chat_1", DeliveryStatus.PENDING),
        ("turn.started", "chat_2", DeliveryStatus.PENDING),
    ]


async def test_enqueue_reads_at_most_the_limit_and_resumes_after_it(backend: Backend) -> None:
    """The cursor moves by the changes read, so the next call continues where it stopped."""
    await backend.store.add_subscription(subscription("all"))
    await backend.add_changes([("turn.started", f"s{n}") for n in range(5)])
    assert await backend.store.enqueue(3, T0) == (3, {"all": 3})
    assert await backend.store.enqueue(3, T0) == (2, {"all": 2})
    assert await backend.store.enqueue(3, T0) == (0, {})


async def test_a_claim_leases_due_deliveries_with_their_bodies(backend: Backend) -> None:
    """Claimed deliveries carry the change's body (a raw one rebuilt from its event) and
    are not claimed again while leased."""
    store = backend.store
    clock = Clock()
    await store.add_subscription(subscription("sub_a", types=("turn.*", "raw.*")))
    seq = await backend.add_event("agent.ping", "chat_1", "2027-01-15T08:00:00Z")
    (change,) = await backend.add_changes([("turn.started", "chat_1")])
    raw = await backend.add_raw_change(seq, "chat_1")
    await store.enqueue(100, T0)
    claimed = await claim_all(store, "sub_a", clock, limit=1)
    assert [(d.change_id, d.message_id) for d in claimed] == [(change, f"msg_{change}")]
    assert orjson.loads(claimed[0].body) == {"id": change, "type": "turn.started"}
    rest = await claim_all(store, "sub_a", clock)
    assert [d.change_id for d in rest] == [raw]
    body = orjson.loads(rest[0].body)
    assert body["type"] == "raw.agent.ping"
    assert body["id"] == raw
    assert await claim_all(store, "sub_a", clock) == []
    delivery = await store.get_delivery(claimed[0].id)
    assert delivery is not None
    assert delivery.status is DeliveryStatus.DELIVERING


async def test_record_moves_deliveries_on_and_logs_every_attempt(backend: Backend) -> None:
    """A retry is due at its time, a success ends the delivery, and both attempts are logged."""
    store = backend.store
    clock = Clock()
    await store.add_subscription(subscription("sub_a"))
    await backend.add_changes([("turn.started", "chat_1")])
    await store.enqueue(100, T0)
    (first,) = await claim_all(store, "sub_a", clock)
    await store.record([result(first, T0 + 1, DeliveryStatus.RETRYING, T0 + 60, code=503)])
    retrying = await store.get_delivery(first.id)
    assert retrying is not None
    assert retrying.status is DeliveryStatus.RETRYING
    assert retrying.next_attempt_at == T0 + 60
    assert retrying.last_status == 503
    failing = await store.get_subscription("sub_a")
    assert failing is not None
    assert failing.failing_since == T0 + 1
    clock.now = T0 + 59
    claimed, next_due = await store.claim([ClaimRequest("sub_a", 10, False)], clock, LEASE)
    assert claimed == []
    assert next_due == {"sub_a": T0 + 60}
    clock.now = T0 + 60
    (second,) = await claim_all(store, "sub_a", clock)
    assert second.id == first.id
    assert second.cycle_attempts == 1
    await deliver(store, [second], T0 + 61)
    done = await store.get_delivery(first.id)
    assert done is not None
    assert done.status is DeliveryStatus.DELIVERED
    assert done.attempts == 2
    assert done.next_attempt_at is None
    attempts = await store.list_attempts([first.id])
    assert [a.status_code for a in attempts[first.id]] == [503, 200]
    healthy = await store.get_subscription("sub_a")
    assert healthy is not None
    assert healthy.failing_since is None
    assert await store.queue_depth() == 0
    delivered = await store.list_deliveries("sub_a", DeliveryStatus.DELIVERED, 0, 10)
    assert [d.id for d in delivered] == [first.id]
    assert await store.list_deliveries("sub_a", DeliveryStatus.FAILED, 0, 10) == []


async def test_a_disabling_result_disables_unless_enabled_since(backend: Backend) -> None:
    """A 410's result disables the subscription, unless the API enabled it after the attempt."""
    store = backend.store
    clock = Clock()
    await store.add_subscription(subscription("sub_a"))
    await backend.add_changes([("turn.started", "chat_1"), ("turn.started", "chat_2")])
    await store.enqueue(100, T0)
    first, second = await claim_all(store, "sub_a", clock)
    await store.update_subscription("sub_a", {"enabled": True, "enabled_changed_at": T0 + 5})
    await store.record(
        [result(first, T0 + 1, DeliveryStatus.FAILED, code=410, disable_reason="410")]
    )
    kept = await store.get_subscription("sub_a")
    assert kept is not None
    assert kept.enabled
    await store.record(
        [result(second, T0 + 9, DeliveryStatus.FAILED, code=410, disable_reason="gone")]
    )
    gone = await store.get_subscription("sub_a")
    assert gone is not None
    assert not gone.enabled
    assert gone.disabled_reason == "gone"


async def test_a_claim_takes_no_more_than_the_request_limit(backend: Backend) -> None:
    """A claim returns at most `limit` deliveries, oldest due first."""
    await backend.store.add_subscription(subscription("sub_a"))
    ids = await backend.add_changes([("turn.started", f"s{n}") for n in range(5)])
    await backend.store.enqueue(100, T0)
    claimed = await claim_all(backend.store, "sub_a", Clock(), limit=2)
    assert [d.change_id for d in claimed] == ids[:2]


async def test_session_order_lets_one_delivery_per_session_go_at_a_time(
    backend: Backend,
) -> None:
    """With session ordering, a session's next change waits until the previous one ends."""
    store = backend.store
    clock = Clock()
    await store.add_subscription(subscription("sub_a", ordering=Ordering.SESSION))
    a1, b1, a2, b2 = await backend.add_changes(
        [("turn.started", "a"), ("turn.started", "b"), ("turn.completed", "a"), ("x", "b")]
    )
    await store.enqueue(100, T0)
    first = await claim_all(store, "sub_a", clock, ordered=True)
    assert sorted(d.change_id or 0 for d in first) == [a1, b1]
    assert await claim_all(store, "sub_a", clock, ordered=True) == []
    (done_a,) = [d for d in first if d.change_id == a1]
    await deliver(store, [done_a], T0 + 1)
    next_a = await claim_all(store, "sub_a", clock, ordered=True)
    assert [d.change_id for d in next_a] == [a2]
    await deliver(store, next_a, T0 + 2)
    (retry_b,) = [d for d in first if d.change_id == b1]
    await store.record([result(retry_b, T0 + 1, DeliveryStatus.RETRYING, T0 + 100, code=500)])
    assert await claim_all(store, "sub_a", clock, ordered=True) == []  # b2 waits behind b1
    clock.now = T0 + 100
    assert [d.change_id for d in await claim_all(store, "sub_a", clock, ordered=True)] == [b1]
    assert b2 > b1


async def test_a_test_delivery_carries_its_own_body(backend: Backend) -> None:
    """A test event is queued with its body and a message id of its own."""
    store = backend.store
    await store.add_subscription(subscription("sub_a", ordering=Ordering.SESSION))
    added = await store.add_test_delivery("sub_a", b'{"test":1}', T0)
    assert added is not None
    assert added.change_id is None
    assert added.type == "webhook.test"
    assert await store.add_test_delivery("nope", b"{}", T0) is None
    (claimed,) = await claim_all(store, "sub_a", Clock(), ordered=True)
    assert claimed.body == b'{"test":1}'
    assert claimed.message_id == f"msg_test_{added.id}"


async def test_retry_delivery_requeues_a_finished_delivery_but_not_a_leased_one(
    backend: Backend,
) -> None:
    """A failed delivery is due again at once with a fresh schedule; a leased one is refused."""
    store = backend.store
    clock = Clock()
    await store.add_subscription(subscription("sub_a"))
    await backend.add_changes([("turn.started", "chat_1")])
    await store.enqueue(100, T0)
    (claimed,) = await claim_all(store, "sub_a", clock)
    with pytest.raises(DeliveryNotRetryable):
        await store.retry_delivery(claimed.id, T0 + 1)
    await store.record([result(claimed, T0 + 1, DeliveryStatus.FAILED, code=400)])
    retried = await store.retry_delivery(claimed.id, T0 + 2)
    assert retried is not None
    assert retried.status is DeliveryStatus.PENDING
    assert retried.cycle_attempts == 0
    assert retried.next_attempt_at == T0 + 2
    clock.now = T0 + 2
    assert [d.id for d in await claim_all(store, "sub_a", clock)] == [claimed.id]
    assert await store.retry_delivery(999_999, T0) is None


async def test_recover_queues_what_was_missed_since_a_time(backend: Backend) -> None:
    """Recover requeues failed deliveries and adds the changes a subscription never got,
    from the first event received since the time given; running it again adds nothing."""
    store = backend.store
    clock = Clock()
    old = await backend.add_event("agent.turn", "chat_1", "2027-01-15T07:00:00Z")
    (before,) = await backend.add_changes([("turn.started", "chat_1")], event_seq=old)
    new = await backend.add_event("agent.turn", "chat_1", "2027-01-15T09:00:00Z")
    missed = await backend.add_changes([("turn.completed", "chat_1")], event_seq=new)
    await store.add_subscription(subscription("sub_a"))
    await backend.add_changes([("turn.failed", "chat_1")], event_seq=new)
    await store.enqueue(100, T0)
    (failed,) = await claim_all(store, "sub_a", clock)
    await store.record([result(failed, T0 + 1, DeliveryStatus.FAILED, code=400)])
    queued = await store.recover("sub_a", "2027-01-15T08:00:00Z", T0 + 2)
    assert queued == 2  # the failed one again, and the one it never had
    rows = await store.list_deliveries("sub_a", DeliveryStatus.PENDING, 0, 10)
    assert sorted(d.change_id or 0 for d in rows) == sorted([*missed, failed.change_id or 0])
    assert before not in {d.change_id for d in rows}
    assert await store.recover("sub_a", "2027-01-15T08:00:00Z", T0 + 3) == 0
    with pytest.raises(KeyError):
        await store.recover("nope", "2027-01-15T08:00:00Z", T0)


async def test_released_claims_are_due_again_once_their_lease_has_ended(
    backend: Backend,
) -> None:
    """After a restart, a delivery whose lease ended is pending and due again."""
    store = backend.store
    clock = Clock()
    await store.add_subscription(subscription("sub_a"))
    await backend.add_changes([("turn.started", "chat_1")])
    await store.enqueue(100, T0)
    (claimed,) = await claim_all(store, "sub_a", clock)
    after_lease = T0 + LEASE + 1
    assert await store.release_claims(after_lease) == 1
    released = await store.get_delivery(claimed.id)
    assert released is not None
    assert released.status is DeliveryStatus.PENDING
    assert released.next_attempt_at == after_lease
    clock.now = after_lease
    assert [d.id for d in await claim_all(store, "sub_a", clock)] == [claimed.id]


async def test_deleting_a_subscription_removes_its_deliveries(backend: Backend) -> None:
    """A removed subscription's deliveries and attempts go with it, and a late result is ignored."""
    store = backend.store
    await store.add_subscription(subscription("sub_a"))
    await backend.add_changes([("turn.started", "chat_1")])
    await store.enqueue(100, T0)
    (claimed,) = await claim_all(store, "sub_a", Clock())
    assert await store.delete_subscription("sub_a")
    await deliver(store, [claimed], T0 + 1)
    assert await store.get_delivery(claimed.id) is None
    assert await store.list_attempts([claimed.id]) == {claimed.id: []}
    assert await store.queue_depth() == 0


# -- alert formats -------------------------------------------------------------------------

ROUTING_KEY = "R0UT1NGKEY0123456789abcdef012345"
TRIGGER, RESOLVE = Action.TRIGGER, Action.RESOLVE


def pagerduty(sid: str, routing_key: bytes = b"encrypted-key", **fields: Any) -> Subscription:
    return replace(subscription(sid, **fields), format=Format.PAGERDUTY, routing_key=routing_key)


def actions_by_change(claimed: Sequence[ClaimedDelivery]) -> dict[int, list[tuple[str, str]]]:
    return {
        d.change_id or 0: [(a.action.value, a.dedup_key) for a in d.alert_actions] for d in claimed
    }


async def test_format_routing_key_and_headers_are_stored_and_updated(backend: Backend) -> None:
    """A PagerDuty subscription's encrypted routing key and its headers come back as stored,
    and updates change the format, drop the key and replace the headers."""
    store = backend.store
    box = SecretBox(bytes(range(32)))
    key = box.encrypt(ROUTING_KEY, routing_key_binding("pd"))
    headers = (("X-Team", "agents"), ("Authorization", "env:PD_TOKEN"))
    await store.add_subscription(replace(pagerduty("pd", key), headers=headers))
    await store.add_subscription(subscription("std"))
    got = await store.get_subscription("pd")
    assert got is not None
    assert got.format is Format.PAGERDUTY
    assert got.routing_key == key
    assert ROUTING_KEY.encode() not in got.routing_key
    assert box.decrypt(got.routing_key, routing_key_binding("pd")) == ROUTING_KEY
    assert got.headers == headers
    listed = {s.id: s for s in await store.list_subscriptions()}
    assert listed["pd"] == got
    assert (listed["std"].format, listed["std"].routing_key, listed["std"].headers) == (
        Format.STANDARD,
        None,
        (),
    )
    updated = await store.update_subscription(
        "pd", {"format": "slack", "routing_key": None, "headers": [("X-Other", "1")]}
    )
    assert updated is not None
    assert (updated.format, updated.routing_key, updated.headers) == (
        Format.SLACK,
        None,
        (("X-Other", "1"),),
    )
    again = await store.update_subscription("std", {"format": Format.PAGERDUTY, "routing_key": key})
    assert again is not None
    assert (again.format, again.routing_key) == (Format.PAGERDUTY, key)


async def test_pagerduty_deliveries_trigger_and_resolve_the_same_dedup_keys(
    backend: Backend,
) -> None:
    """Enqueue decides each PagerDuty delivery's actions from the subscription's open
    incidents: problems trigger, recoveries resolve the same keys, and changes that do
    neither are not queued; retries carry the same actions."""
    store = backend.store
    clock = Clock()
    await store.add_subscription(pagerduty("pd"))
    await store.add_subscription(subscription("std"))
    first = await backend.add_changes(
        [
            ("session.created", "s1"),
            ("session.ready_timeout", "s1"),
            ("turn.started", "s1", "t1"),
            ("turn.stalled", "s1", "t1"),
        ]
    )
    assert await store.enqueue(100, T0) == (4, {"pd": 2, "std": 4})
    await store.add_subscription(pagerduty("late"))  # opened nothing so far
    second = await backend.add_changes(
        [
            ("turn.failed", "s1", "t1"),
            ("turn.completed", "s1", "t2"),
            ("session.ready", "s1"),
            ("turn.completed", "s1", "t3"),
            ("session.ready", "s1"),
        ]
    )
    assert await store.enqueue(2, T0) == (2, {"pd": 2, "std": 2, "late": 2})
    assert await store.enqueue(100, T0) == (3, {"pd": 1, "std": 3})
    ready, stalled, failed = (
        "relay/s1/ready_timeout",
        "relay/s1/turn/t1/stalled",
        "relay/s1/turn_failed",
    )
    claimed = await claim_all(store, "pd", clock)
    assert actions_by_change(claimed) == {
        first[1]: [("trigger", ready)],
        first[3]: [("trigger", stalled)],
        second[0]: [("resolve", stalled), ("trigger", failed)],
        second[1]: [("resolve", failed)],
        second[2]: [("resolve", ready)],
    }
    assert actions_by_change(await claim_all(store, "late", clock)) == {
        second[0]: [("trigger", failed)],
        second[1]: [("resolve", failed)],
    }
    assert all(d.alert_actions == () for d in await claim_all(store, "std", clock))
    assert await store.queue_depths(["pd", "std", "late"]) == {"pd": 5, "std": 9, "late": 2}
    (retried,) = [d for d in claimed if d.change_id == second[0]]
    await store.record(
        [result(retried, T0 + 1, DeliveryStatus.RETRYING, next_attempt_at=T0 + 2, code=500)]
    )
    clock.now = T0 + 2
    (again,) = await claim_all(store, "pd", clock)
    assert (again.id, again.alert_actions) == (retried.id, retried.alert_actions)
    assert again.alert_actions == (
        AlertAction(RESOLVE, stalled),
        AlertAction(TRIGGER, failed),
    )


async def test_queue_depths_count_each_subscriptions_unfinished_deliveries(
    backend: Backend,
) -> None:
    """Queue depth per subscription counts deliveries not yet delivered or failed (leased
    ones too), and 0 for a subscription with none or none known."""
    store = backend.store
    clock = Clock()
    await store.add_subscription(subscription("all"))
    await store.add_subscription(subscription("failed", types=("turn.failed",)))
    await store.add_subscription(pagerduty("pd"))
    await store.add_subscription(subscription("idle", types=("session.ready",)))
    await backend.add_changes(
        [("turn.started", "s1", "t1"), ("turn.failed", "s1", "t1"), ("turn.started", "s2", "t2")]
    )
    await store.enqueue(100, T0)
    sids = ["all", "failed", "pd", "idle", "nope"]
    assert await store.queue_depths(sids) == {"all": 3, "failed": 1, "pd": 1, "idle": 0, "nope": 0}
    claimed = await claim_all(store, "all", clock, limit=2)
    assert (await store.queue_depths(["all"]))["all"] == 3
    await store.record(
        [
            result(claimed[0], T0 + 1, DeliveryStatus.DELIVERED),
            result(claimed[1], T0 + 1, DeliveryStatus.FAILED, code=400),
        ]
    )
    assert await store.queue_depths(sids) == {"all": 1, "failed": 1, "pd": 1, "idle": 0, "nope": 0}
    assert await store.queue_depths([]) == {}


async def test_recover_to_pagerduty_sends_what_brings_incidents_to_now(backend: Backend) -> None:
    """Recovered PagerDuty deliveries resolve what is no longer open and trigger nothing
    that was not opened; a change that would do neither is not queued."""
    store = backend.store
    new = await backend.add_event("agent.turn", "s1", "2027-01-15T09:00:00Z")
    stalled_t1, failed_t1 = await backend.add_changes(
        [("turn.stalled", "s1", "t1"), ("turn.failed", "s1", "t1")], event_seq=new
    )
    await store.add_subscription(pagerduty("pd"))
    (stalled_t2,) = await backend.add_changes([("turn.stalled", "s1", "t2")], event_seq=new)
    await store.enqueue(100, T0)
    assert await store.recover("pd", "2027-01-15T08:00:00Z", T0 + 1) == 1
    claimed = await claim_all(store, "pd", Clock(T0 + 1))
    assert actions_by_change(claimed) == {
        failed_t1: [("resolve", "relay/s1/turn/t1/stalled")],
        stalled_t2: [("trigger", "relay/s1/turn/t2/stalled")],
    }
    assert stalled_t1 not in actions_by_change(claimed)
    assert await store.recover("pd", "2027-01-15T08:00:00Z", T0 + 2) == 0


# -- PostgreSQL only: several instances on one database ------------------------------------


async def test_two_instances_claiming_at_once_never_claim_the_same_delivery(pg: Backend) -> None:
    """Concurrent claims from two instances split the due deliveries between them."""
    other = await pg.another_instance()
    await pg.store.add_subscription(subscription("sub_a", max_in_flight=1000))
    await pg.add_changes([("turn.started", f"s{n}") for n in range(300)])
    await pg.store.enqueue(1000, T0)
    taken: dict[int, list[int]] = {0: [], 1: []}

    async def take(index: int, store: DeliveryStore) -> None:
        while True:
            claimed = await claim_all(store, "sub_a", Clock(), limit=7)
            if not claimed:
                return
            taken[index] += [d.id for d in claimed]

    await asyncio.gather(*(take(i % 2, s) for i, s in enumerate([pg.store, other] * 3)))
    assert taken[0]
    assert taken[1]
    assert not set(taken[0]) & set(taken[1])
    assert len(taken[0]) + len(taken[1]) == len(set(taken[0]) | set(taken[1])) == 300


async def test_an_ended_lease_is_taken_over_by_another_instance(pg: Backend) -> None:
    """A dead instance's delivery is claimed by another once its lease ends; the first
    instance's late result is logged but does not move the new claim on."""
    other = await pg.another_instance()
    await pg.store.add_subscription(subscription("sub_a"))
    await pg.add_changes([("turn.started", "chat_1")])
    await pg.store.enqueue(100, T0)
    (first,) = await claim_all(pg.store, "sub_a", Clock(T0))
    claimed, next_due = await other.claim([ClaimRequest("sub_a", 10, False)], Clock(T0 + 10), LEASE)
    assert claimed == []
    assert next_due == {"sub_a": T0 + LEASE}  # the other instance comes back when it ends
    (second,) = await claim_all(other, "sub_a", Clock(T0 + LEASE))
    assert second.id == first.id
    await deliver(pg.store, [first], T0 + LEASE + 1)  # the first instance, late
    still = await pg.store.get_delivery(first.id)
    assert still is not None
    assert still.status is DeliveryStatus.DELIVERING
    assert still.next_attempt_at == T0 + 2 * LEASE
    await deliver(other, [second], T0 + LEASE + 2)
    done = await pg.store.get_delivery(first.id)
    assert done is not None
    assert done.status is DeliveryStatus.DELIVERED
    assert len((await pg.store.list_attempts([first.id]))[first.id]) == 2


async def test_release_claims_leaves_leases_that_have_not_ended(pg: Backend) -> None:
    """An instance that starts releases only ended leases: others may be attempting the rest."""
    other = await pg.another_instance()
    await pg.store.add_subscription(subscription("sub_a"))
    await pg.add_changes([("turn.started", "chat_1")])
    await pg.store.enqueue(100, T0)
    (claimed,) = await claim_all(pg.store, "sub_a", Clock(T0))
    assert await other.release_claims(T0 + LEASE - 1) == 0
    leased = await other.get_delivery(claimed.id)
    assert leased is not None
    assert leased.status is DeliveryStatus.DELIVERING
    assert await claim_all(other, "sub_a", Clock(T0 + LEASE - 1)) == []
    assert await other.release_claims(T0 + LEASE) == 1


async def test_a_starting_instance_releases_the_leases_of_instances_that_are_gone(
    pg: Backend,
) -> None:
    """Leases of an instance whose connection ended are released at once on a start;
    a live instance's are kept until they end."""
    live = await pg.another_instance()
    await pg.store.add_subscription(subscription("sub_a"))
    await pg.add_changes([("x", "a"), ("x", "b")])
    await pg.store.enqueue(100, T0)
    (gone,) = await claim_all(pg.store, "sub_a", Clock(T0), limit=1)
    (kept,) = await claim_all(live, "sub_a", Clock(T0), limit=1)
    await pg.store.close()  # its liveness lock goes with its connection
    starting = await pg.another_instance()
    assert await starting.release_claims(T0 + 1) == 1
    released = await starting.get_delivery(gone.id)
    assert released is not None
    assert released.status is DeliveryStatus.PENDING
    still = await starting.get_delivery(kept.id)
    assert still is not None
    assert still.status is DeliveryStatus.DELIVERING
    assert [d.id for d in await claim_all(starting, "sub_a", Clock(T0 + 1))] == [gone.id]


async def test_max_in_flight_and_session_order_hold_across_instances(pg: Backend) -> None:
    """Deliveries leased by one instance count against max_in_flight and hold their
    sessions for the other."""
    other = await pg.another_instance()
    await pg.store.add_subscription(
        subscription("sub_a", ordering=Ordering.SESSION, max_in_flight=2)
    )
    a1, b1, a2, c1 = await pg.add_changes([("x", "a"), ("x", "b"), ("x", "a"), ("x", "c")])
    await pg.store.enqueue(100, T0)
    first = await claim_all(pg.store, "sub_a", Clock(), limit=2, ordered=True)
    assert [d.change_id for d in first] == [a1, b1]
    assert await claim_all(other, "sub_a", Clock(), limit=2, ordered=True) == []  # slots full
    await deliver(pg.store, first[1:], T0 + 1)  # b1 done: one slot free, a2 still waits
    assert [d.change_id for d in await claim_all(other, "sub_a", Clock(), ordered=True)] == [c1]
    await deliver(pg.store, first[:1], T0 + 2)  # a1 done: a2 may go
    (last,) = await claim_all(other, "sub_a", Clock(), ordered=True)
    assert last.change_id == a2


async def test_concurrent_instances_keep_session_order_and_max_in_flight(pg: Backend) -> None:
    """Two instances claiming and recording at once never exceed max_in_flight, never
    attempt a session's change before the previous one is recorded, and deliver all."""
    other = await pg.another_instance()
    limit = 3
    await pg.store.add_subscription(
        subscription("sub_a", ordering=Ordering.SESSION, max_in_flight=limit)
    )
    ids = await pg.add_changes([("x", f"s{n % 4}") for n in range(80)])
    session_of = {cid: f"s{(cid - ids[0]) % 4}" for cid in ids}
    await pg.store.enqueue(1000, T0)
    # Each attempt's window here lies inside its lease, so what overlaps here overlapped
    # there too.
    attempting: list[str] = []
    most = 0
    together: list[str] = []  # a session attempted twice at once
    order: dict[str, list[int]] = {}
    claims = 0
    claimed_since = asyncio.Condition()

    async def work(store: DeliveryStore) -> None:
        nonlocal most, claims
        idle = 0
        while idle < 3:
            claimed = await claim_all(store, "sub_a", Clock(), limit=limit, ordered=True)
            async with claimed_since:
                claims += 1
                mine = claims
                claimed_since.notify_all()
            sessions = [session_of[d.change_id or 0] for d in claimed]
            together.extend(s for s in sessions if s in attempting)
            attempting.extend(sessions)
            most = max(most, len(attempting))
            for d, session in zip(claimed, sessions, strict=True):
                order.setdefault(session, []).append(d.change_id or 0)
            idle = 0 if claimed else idle + 1
            if claimed:  # the attempt: it lasts until another claim came (or 2 s)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2), claimed_since:
                        await claimed_since.wait_for(lambda: claims > mine)  # noqa: B023
            for session in sessions:
                attempting.remove(session)
            if claimed:
                await deliver(store, claimed, T0 + 1)

    await asyncio.gather(*(work(store) for store in (pg.store, other, pg.store, other)))
    for _ in range(10):  # workers that went idle early may have left heads freed late
        if not await pg.store.queue_depth():
            break
        await work(pg.store)
    assert await pg.store.queue_depth() == 0
    assert 0 < most <= limit
    assert together == []
    assert sorted(cid for seen in order.values() for cid in seen) == ids  # each once
    assert all(seen == sorted(seen) for seen in order.values())


async def test_a_subscription_disabled_on_one_instance_is_not_claimed_on_another(
    pg: Backend,
) -> None:
    """A 410 recorded by one instance, or a disable through another, stops every claim."""
    other = await pg.another_instance()
    await pg.store.add_subscription(subscription("sub_a"))
    await pg.add_changes([("x", "a"), ("x", "b")])
    await pg.store.enqueue(100, T0)
    (first,) = await claim_all(pg.store, "sub_a", Clock(), limit=1)
    await pg.store.record(
        [result(first, T0 + 1, DeliveryStatus.FAILED, code=410, disable_reason="410 Gone")]
    )
    claimed, next_due = await other.claim([ClaimRequest("sub_a", 10, False)], Clock(), LEASE)
    assert claimed == []
    assert next_due == {}
    await other.update_subscription("sub_a", {"enabled": True, "enabled_changed_at": T0 + 2})
    assert len(await claim_all(pg.store, "sub_a", Clock(), limit=1)) == 1
    await other.delete_subscription("sub_a")
    assert await claim_all(pg.store, "sub_a", Clock()) == []


async def test_enqueue_from_two_instances_at_once_queues_each_change_once(pg: Backend) -> None:
    """Concurrent enqueues share one cursor: every change is turned into deliveries once."""
    other = await pg.another_instance()
    await pg.store.add_subscription(subscription("all"))
    await pg.store.add_subscription(subscription("turns", types=("turn.*",)))
    await pg.add_changes(
        [("turn.started" if n % 2 else "session.ready", f"s{n}") for n in range(400)]
    )
    reads: list[int] = []
    counts: dict[str, int] = {}

    async def drain(store: DeliveryStore) -> None:
        while True:
            read, got = await store.enqueue(37, T0)
            reads.append(read)
            for sid, count in got.items():
                counts[sid] = counts.get(sid, 0) + count
            if not read:
                return

    await asyncio.gather(drain(pg.store), drain(other), drain(pg.store), drain(other))
    assert sum(reads) == 400
    assert counts == {"all": 400, "turns": 200}
    assert await pg.store.queue_depth() == 600


async def test_instances_starting_together_migrate_once(pg_url: str) -> None:
    """Concurrent migration runs apply each version once; the others find it done."""
    runs = await asyncio.gather(*(migrate_postgres(pg_url) for _ in range(3)))
    applied = [run for run in runs if run]
    assert len(applied) == 1
    assert 3 in applied[0]
    assert await migrate_postgres(pg_url) == []


async def test_enqueue_from_two_instances_keeps_incidents_in_change_order(pg: Backend) -> None:
    """Concurrent enqueues decide PagerDuty actions exactly as one enqueuer reading the
    changes in order would: each resolve follows its trigger, none is lost or doubled."""
    other = await pg.another_instance()
    await pg.store.add_subscription(pagerduty("pd", max_in_flight=1000))
    kinds = ["turn.stalled", "turn.failed", "turn.completed", "turn.stalled", "turn.completed"]
    changes = [(kinds[n % 5], f"s{n % 3}", f"t{n // 5}") for n in range(300)]
    ids = await pg.add_changes(changes)
    expected: dict[int, list[tuple[str, str]]] = {}
    open_keys: dict[str, int] = {}
    for change_id, (kind, session, turn) in zip(ids, changes, strict=True):
        decided = decide_actions(incident_effect(kind, session, turn), open_keys, change_id)
        if decided:
            expected[change_id] = [(a.action.value, a.dedup_key) for a in decided]

    async def drain(store: DeliveryStore) -> None:
        while (await store.enqueue(7, T0))[0]:
            pass

    await asyncio.gather(drain(pg.store), drain(other), drain(pg.store), drain(other))
    claimed = await claim_all(pg.store, "pd", Clock(), limit=1000)
    assert actions_by_change(claimed) == expected
    assert any(action == "resolve" for got in expected.values() for action, _ in got)


async def test_a_subscription_removed_during_an_enqueue_does_not_fail_it(pg: Backend) -> None:
    """An enqueue that meets a removal in progress waits for it, then queues for the
    subscriptions that remain."""
    await pg.store.add_subscription(pagerduty("gone"))
    await pg.store.add_subscription(subscription("kept"))
    await pg.add_changes([("turn.stalled", "s1", "t1")])
    remover = await asyncpg.connect(pg.settings.url)
    try:
        removal = remover.transaction()
        await removal.start()
        await remover.execute("DELETE FROM subscriptions WHERE id = 'gone'")
        enqueue = asyncio.create_task(pg.store.enqueue(100, T0))
        deadline = asyncio.get_running_loop().time() + 10
        while not await remover.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()"
        ):
            assert asyncio.get_running_loop().time() < deadline, "the enqueue never waited"
            await asyncio.sleep(0.02)
        await removal.commit()
    finally:
        await remover.close()
    assert await enqueue == (1, {"kept": 1})
    assert await pg.store.queue_depths(["gone", "kept"]) == {"gone": 0, "kept": 1}
