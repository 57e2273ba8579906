"""The dispatcher under stress: shutdown, slow stores, failing attempts, unreadable secrets."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay.appkeys import DISPATCHER
from relay.webhooks.model import AttemptResult
from tests.conftest import LIFECYCLE_CHANGES, Relay, RelayFactory, fixture_events
from tests.receivers import (
    FAST_DELIVERY,
    Receipt,
    Receiver,
    api,
    eventually,
    receiver,
    subscribe,
    until,
    witness,
)
from tests.test_read_api import ingest


async def deliveries(relay: Relay, sub_path: str) -> list[dict[str, Any]]:
    """The subscription's deliveries, oldest first."""
    page = await api(relay, "GET", f"{sub_path}/deliveries", params={"limit": 1000})
    items: list[dict[str, Any]] = page["items"]
    return items


async def written(relay: Relay, sub_path: str, *statuses: str) -> None:
    """Wait until the subscription's deliveries have these statuses, oldest first: the
    results of its attempts have been written."""

    async def reached() -> bool:
        found = [d["status"] for d in await deliveries(relay, sub_path)]
        return found[: len(statuses)] == list(statuses)

    await until(reached)


def delivery_rows(db: Path) -> list[tuple[str, int]]:
    """Each delivery's status and how many attempt rows it has."""
    with sqlite3.connect(db) as conn:
        rows: list[tuple[str, int]] = conn.execute(
            "SELECT d.status, (SELECT count(*) FROM delivery_attempts a"
            " WHERE a.delivery_id = d.id) FROM deliveries d ORDER BY d.id"
        ).fetchall()
    conn.close()
    return rows


async def test_attempts_finishing_during_the_grace_are_recorded(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """In-flight attempts that answer 2xx during the shutdown grace end delivered, with their
    attempt rows, once the app is closed."""
    relay = await start_relay(delivery={**FAST_DELIVERY, "shutdown_grace_seconds": 3})
    gate = asyncio.Event()
    arrivals: list[str] = []

    async def staggered(receipt: Receipt, seen: int) -> web.Response:
        arrivals.append(receipt.message_id)
        position = len(arrivals)
        await gate.wait()
        await asyncio.sleep(0.05 * position)
        return web.Response(text="ok")

    async with receiver() as got:
        got.endpoint("/slow", staggered)
        await subscribe(relay, got, "/slow")
        for event in fixture_events():
            await ingest(relay, event)
        await eventually(lambda: len(arrivals) == len(LIFECYCLE_CHANGES))
        closing = asyncio.create_task(relay.client.close())
        await asyncio.sleep(0.1)
        gate.set()
        await asyncio.wait_for(closing, 10)
    rows = delivery_rows(tmp_path / "relay.db")
    assert rows == [("delivered", 1)] * len(LIFECYCLE_CHANGES)


async def test_a_delivery_being_attempted_is_not_claimed_again(start_relay: RelayFactory) -> None:
    """A session-ordered delivery still being attempted after its lease ran out is not sent
    again, and the session's next change waits for it: d1 then d2, each once."""
    offset = [0.0]
    relay = await start_relay(delivery=FAST_DELIVERY, clock=lambda: time.time() + offset[0])
    gate = asyncio.Event()

    async def held(receipt: Receipt, seen: int) -> web.Response:
        await gate.wait()
        return web.Response(text="ok")

    async with receiver() as got:
        got.endpoint("/ordered", held)
        created = await subscribe(
            relay, got, "/ordered", ordering="session", types=["session.created", "session.ready"]
        )
        events = fixture_events()
        await ingest(relay, events[0])
        await eventually(lambda: len(got.receipts) == 1)
        offset[0] = FAST_DELIVERY["timeout_seconds"] + 120  # past the lease
        witnessed = await witness(relay, got)
        for event in events[1:4]:  # session.ready, which wakes the scheduler
            await ingest(relay, event)
        await witnessed(3)  # the changes of events[1:4], scheduled after the lease ran out
        assert len(got.at("/ordered", delivered=False)) == 1
        gate.set()
        await written(relay, f"/v1/subscriptions/{created['id']}", "delivered", "delivered")
        sent = [r.payload["type"] for r in got.at("/ordered", delivered=False)]
        assert sent == ["session.created", "session.ready"]


async def test_an_attempt_that_fails_before_its_request_frees_its_slot(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """An attempt that raises before sending (its change is missing from the log) is recorded
    with the error and frees its slot, so the subscription's next delivery still goes."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        created = await subscribe(relay, got, "/one", max_in_flight=1, types=["session.created"])
        with sqlite3.connect(tmp_path / "relay.db") as conn:
            conn.execute(
                "INSERT INTO deliveries (subscription_id, change_id, type, status,"
                " next_attempt_at, created_at, updated_at)"
                " VALUES (?, 999999, 'session.created', 'pending', 0, 0, 0)",
                (created["id"],),
            )
        conn.close()
        await ingest(relay, fixture_events()[0])
        await eventually(lambda: len(got.at("/one")) == 1)
    with sqlite3.connect(tmp_path / "relay.db") as conn:
        [error] = conn.execute(
            "SELECT a.error FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id"
            " WHERE d.change_id = 999999 ORDER BY a.id LIMIT 1"
        ).fetchone()
    conn.close()
    assert error.startswith("TypeError")


async def test_an_undecryptable_secret_leaves_only_its_subscription_out(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """A subscription whose stored secret does not decrypt is left out; the API still creates
    and lists subscriptions, and the others still receive their changes."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        broken = await subscribe(relay, got, "/broken", types=["session.created"])
        with sqlite3.connect(tmp_path / "relay.db") as conn:
            conn.execute(
                "UPDATE subscriptions SET secret = randomblob(60) WHERE id = ?", (broken["id"],)
            )
        conn.close()
        await subscribe(relay, got, "/fine", types=["session.created"])  # 201, not 500
        listing = await api(relay, "GET", "/v1/subscriptions")
        assert len(listing["items"]) == 2
        await ingest(relay, fixture_events()[0])
        await eventually(lambda: len(got.at("/fine")) == 1)
        assert got.at("/broken", delivered=False) == []


async def test_a_session_ordered_subscription_gets_its_test_event(
    start_relay: RelayFactory,
) -> None:
    """A test event (which belongs to no session) reaches a session-ordered subscription."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        created = await subscribe(relay, got, "/ordered", ordering="session")
        await api(relay, "POST", f"/v1/subscriptions/{created['id']}/test", status=202)
        await eventually(lambda: len(got.at("/ordered")) == 1)
        assert got.at("/ordered")[0].payload["type"] == "webhook.test"


async def test_changes_before_the_first_subscription_are_never_read_for_delivery(
    start_relay: RelayFactory, tmp_path: Path
) -> None:
    """With no subscription the enqueuer leaves the change log alone; the first subscription
    moves the delivery cursor to its start, and gets every change after it, in order."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    db = tmp_path / "relay.db"
    events = fixture_events()

    def cursor_and_last_change() -> tuple[int, int]:
        with sqlite3.connect(db) as conn:
            (cursor,) = conn.execute("SELECT last_change_id FROM delivery_cursor").fetchone()
            (last,) = conn.execute("SELECT max(id) FROM changes").fetchone()
        conn.close()
        return cursor, last

    dispatcher = relay.client.app[DISPATCHER]

    async def enqueuer_woke() -> None:
        """The enqueuer took the wake-up of the last commit (it clears the flag first)."""
        await eventually(lambda: not dispatcher._changes.is_set())

    for event in events[:3]:
        await ingest(relay, event)
    await enqueuer_woke()
    await ingest(relay, events[3])
    await enqueuer_woke()  # so its pass for events[:3] has ended, whatever it did
    cursor, before = cursor_and_last_change()
    assert cursor == 0
    assert before > 0
    async with receiver() as got:
        created = await subscribe(relay, got, "/after")
        assert cursor_and_last_change() == (before, before)
        for event in events[4:]:
            await ingest(relay, event)
        with sqlite3.connect(db) as conn:
            wanted = [
                change_id
                for (change_id,) in conn.execute(
                    "SELECT id FROM changes WHERE id > ? AND type NOT LIKE 'raw.%' ORDER BY id",
                    (before,),
                )
            ]
        conn.close()
        assert wanted
        await eventually(lambda: len(got.at("/after")) == len(wanted))
        await written(relay, f"/v1/subscriptions/{created['id']}", *["delivered"] * len(wanted))
        assert sorted(r.change_id for r in got.at("/after")) == wanted


def slow_writes(
    monkeypatch: pytest.MonkeyPatch, seconds: float, of: Callable[[AttemptResult], bool]
) -> None:
    """The delivery store waits `seconds` before it writes a batch of attempt results
    holding one that `of` picks (as it would for SQLite's write lock under load)."""
    from relay.webhooks.sqlite_store import SQLiteDeliveryStore

    real_record = SQLiteDeliveryStore.record

    async def slow_record(self: SQLiteDeliveryStore, results: Sequence[AttemptResult]) -> None:
        if any(of(result) for result in results):
            await asyncio.sleep(seconds)
        await real_record(self, results)

    monkeypatch.setattr(SQLiteDeliveryStore, "record", slow_record)


def slow_to_write_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The delivery store takes 0.6 s (three reloads) to write a result that disables."""
    slow_writes(monkeypatch, 0.6, lambda result: result.disable_reason is not None)


async def test_a_410_holds_while_its_result_waits_to_be_written(
    start_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscription a 410 disabled gets nothing more, even when the store is slow to
    write that result and the dispatcher reloads subscriptions meanwhile (which still read
    it enabled)."""
    slow_to_write_disables(monkeypatch)  # several reloads (every 0.2 s) happen meanwhile
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        got.endpoint("/gone", lambda receipt, seen: web.Response(status=410))
        created = await subscribe(relay, got, "/gone")
        events = fixture_events()
        await ingest(relay, events[0])
        await eventually(lambda: len(got.at("/gone", delivered=False)) == 1)
        witnessed = await witness(relay, got)
        for event in events[1:]:  # each makes a change; none may be sent
            await ingest(relay, event)
        await witnessed(len(LIFECYCLE_CHANGES) - 1)
        await written(relay, f"/v1/subscriptions/{created['id']}", "failed")
    assert len(got.at("/gone", delivered=False)) == 1


async def test_a_410_reaches_the_subscription_a_reload_put_in_its_place(
    start_relay: RelayFactory,
) -> None:
    """A 410 answered after the dispatcher reloaded its subscriptions (every 0.2 s here)
    still disables the subscription it schedules from: the changes waiting behind that
    attempt are not sent."""
    relay = await start_relay(delivery=FAST_DELIVERY)

    async def gone_slowly(receipt: Receipt, seen: int) -> web.Response:
        await asyncio.sleep(0.5)  # reloads happen while this attempt is out
        return web.Response(status=410)

    async with receiver() as got:
        got.endpoint("/gone", gone_slowly)
        created = await subscribe(relay, got, "/gone", max_in_flight=1)
        events = fixture_events()
        await ingest(relay, events[0])
        await eventually(lambda: len(got.at("/gone", delivered=False)) == 1)
        witnessed = await witness(relay, got)
        for event in events[1:]:  # they wait behind the attempt out (max_in_flight 1)
            await ingest(relay, event)
        await written(relay, f"/v1/subscriptions/{created['id']}", "failed")
        await witnessed(len(LIFECYCLE_CHANGES) - 1)
    assert len(got.at("/gone", delivered=False)) == 1


def busy_sessions(count: int) -> list[dict[str, Any]]:
    """The fixture lifecycle for `count` sessions of its own each."""
    events = []
    for n in range(count):
        for event in fixture_events():
            data = {**event["data"], "chatId": f"chat_{n}"}
            events.append({**event, "id": f"{event['id']}_{n}", "data": data})
    return events


async def test_a_pause_through_the_api_holds_under_steady_deliveries(
    start_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PATCH enabled=false stops deliveries at once, also while results of earlier attempts
    are still being written (a store waiting 50 ms per write, as under ingest load)."""
    slow_writes(monkeypatch, 0.05, lambda result: True)
    relay = await start_relay(delivery={**FAST_DELIVERY, "poll_interval_seconds": 1.0})

    async def slowish(receipt: Receipt, seen: int) -> web.Response:
        await asyncio.sleep(0.02)
        return web.Response(text="ok")

    async with receiver() as got:
        got.endpoint("/busy", slowish)
        created = await subscribe(relay, got, "/busy", max_in_flight=4)
        events = busy_sessions(60)
        for start in range(0, len(events), 20):
            await asyncio.gather(*(ingest(relay, event) for event in events[start : start + 20]))
        await eventually(lambda: len(got.at("/busy")) >= 40)
        paused = await api(
            relay, "PATCH", f"/v1/subscriptions/{created['id']}", json={"enabled": False}
        )
        assert paused["enabled"] is False
        answered = time.time()
        # Proof the dispatcher went on past the pause: a change made after it reaches a
        # subscription made after it (the paused one's attempts out end meanwhile).
        witnessed = await witness(relay, got)
        extra = fixture_events()[0]
        await ingest(relay, {**extra, "id": "evt_after_pause", "data": {"chatId": "chat_late"}})
        await witnessed(1)
    late = [r for r in got.at("/busy", delivered=False) if r.at > answered + 0.2]
    assert late == []  # the 4 attempts out when it was paused end well before
    busy = len(got.at("/busy", delivered=False))
    assert busy < len(events) * len(LIFECYCLE_CHANGES) // len(fixture_events())


async def first_delivery(
    relay: Relay, got: Receiver, path: str, answer: Callable[[Receipt, int], web.Response]
) -> tuple[str, list[dict[str, Any]]]:
    """Subscribe `path` (answering with `answer`) and send it its first change; the
    subscription's path and the fixture events, the first one ingested."""
    got.endpoint(path, answer)
    created = await subscribe(relay, got, path)
    events = fixture_events()
    await ingest(relay, events[0])
    await eventually(lambda: len(got.receipts) == 1)
    return f"/v1/subscriptions/{created['id']}", events


async def first_410(relay: Relay, got: Receiver) -> tuple[str, list[dict[str, Any]]]:
    """`first_delivery` to `/gone`, which always answers 410."""
    return await first_delivery(relay, got, "/gone", lambda receipt, seen: web.Response(status=410))


async def test_an_enable_after_a_410_wins_over_the_410_written_later(
    start_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enabling through the API after a 410 was answered, but before that result is
    written, leaves the subscription enabled (the later word wins, in the store as in the
    dispatcher); the changes made since are delivered."""
    slow_to_write_disables(monkeypatch)
    relay = await start_relay(delivery=FAST_DELIVERY)

    def gone_once(receipt: Receipt, seen: int) -> web.Response:
        return web.Response(status=410) if len(got.receipts) == 1 else web.Response(text="ok")

    async with receiver() as got:
        sub_path, events = await first_delivery(relay, got, "/back", gone_once)
        await eventually(lambda: got.receipts[0].status == 410)
        enabled = await api(relay, "POST", f"{sub_path}/enable")
        assert enabled["enabled"] is True
        for event in events[1:]:
            await ingest(relay, event)
        await eventually(lambda: len(got.at("/back")) == len(LIFECYCLE_CHANGES) - 1)
        await written(relay, sub_path, "failed")  # the 410's result
        assert (await api(relay, "GET", sub_path))["enabled"] is True


async def test_an_edit_after_a_410_does_not_undo_it(
    start_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Editing anything but `enabled` (here the description) while a 410's result waits to
    be written leaves the subscription disabled: nothing more is sent."""
    slow_to_write_disables(monkeypatch)
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        sub_path, events = await first_410(relay, got)
        await api(relay, "PATCH", sub_path, json={"description": "renamed"})
        witnessed = await witness(relay, got)
        for event in events[1:]:
            await ingest(relay, event)
        await witnessed(len(LIFECYCLE_CHANGES) - 1)
        await written(relay, sub_path, "failed")  # the 410's result
        final = await api(relay, "GET", sub_path)
    assert len(got.at("/gone", delivered=False)) == 1
    assert final["enabled"] is False
    assert final["description"] == "renamed"


async def test_a_410_after_a_re_enable_stops_deliveries_again(
    start_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enabled again while its first 410 waits to be written, a subscription whose endpoint
    is still gone is disabled by the next 410, which holds once the first is written."""
    slow_to_write_disables(monkeypatch)
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        sub_path, events = await first_410(relay, got)
        await api(relay, "POST", f"{sub_path}/enable")
        await ingest(relay, events[1])
        await eventually(lambda: len(got.receipts) == 2)  # the second 410, after the enable
        witnessed = await witness(relay, got)
        for event in events[2:]:
            await ingest(relay, event)
        await witnessed(len(LIFECYCLE_CHANGES) - 2)
        await written(relay, sub_path, "failed", "failed")  # both 410s
        final = await api(relay, "GET", sub_path)
    assert len(got.at("/gone", delivered=False)) == 2
    assert final["enabled"] is False


async def _attempted(relay: Relay, sub_path: str) -> bool:
    return any(d["attempts"] for d in await deliveries(relay, sub_path))


async def test_an_enable_starts_the_failing_count_afresh_even_before_a_failure_is_written(
    start_relay: RelayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enable through the API clears `failing_since`; a failed attempt from before it,
    written after it, does not set it back (else the relay would count the failing run
    toward `disable_after_seconds` from before the enable)."""
    slow_writes(monkeypatch, 0.6, lambda result: result.attempt.status_code == 500)
    relay = await start_relay(delivery={**FAST_DELIVERY, "retry_schedule_seconds": [60]})
    async with receiver() as got:
        got.endpoint("/flaky", lambda receipt, seen: web.Response(status=500))
        created = await subscribe(relay, got, "/flaky")
        sub_path = f"/v1/subscriptions/{created['id']}"
        await ingest(relay, fixture_events()[0])
        await eventually(lambda: len(got.receipts) == 1 and got.receipts[0].status == 500)
        enabled = await api(relay, "POST", f"{sub_path}/enable")
        assert enabled["failing_since"] is None
        await until(lambda: _attempted(relay, sub_path))  # the failure is written
        assert (await api(relay, "GET", sub_path))["failing_since"] is None
