"""Outbound webhooks end to end: a real receiver verifies signed deliveries of the lifecycle."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest
import standardwebhooks
import svix
from aiohttp import web

from tests.conftest import LIFECYCLE_CHANGES, RelayFactory, fixture_events
from tests.receivers import (
    FAST_DELIVERY,
    Receipt,
    api,
    eventually,
    receiver,
    subscribe,
    until,
    witness,
)
from tests.test_read_api import ingest


async def test_receiver_verifies_every_change_of_the_lifecycle(
    start_relay: RelayFactory,
) -> None:
    """Every change of the fixture arrives once, signed, verifiable by standardwebhooks and svix."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        created = await subscribe(relay, got, "/hook")
        assert created["secret"].startswith("whsec_")
        assert created["id"].startswith("sub_")
        for event in fixture_events():
            await ingest(relay, event)
        await eventually(lambda: len(got.at("/hook")) == len(LIFECYCLE_CHANGES))
        receipts = sorted(got.at("/hook"), key=lambda r: r.change_id)
        assert [r.payload["type"] for r in receipts] == LIFECYCLE_CHANGES
        assert all(r.verified for r in receipts)
        for r in receipts:
            assert r.message_id == f"msg_{r.change_id}"
            assert r.payload["data"]["type"] == r.payload["type"]
            assert r.headers["content-type"] == "application/json"
            assert abs(int(r.headers["webhook-timestamp"]) - time.time()) < 60
        first = receipts[0]
        svix_headers = {
            "svix-id": first.headers["webhook-id"],
            "svix-timestamp": first.headers["webhook-timestamp"],
            "svix-signature": first.headers["webhook-signature"],
        }
        svix.Webhook(created["secret"]).verify(first.body, svix_headers)  # raises if forged
        assert first.payload["type"] == "session.created"
        path = f"/v1/subscriptions/{created['id']}/deliveries"

        async def all_written() -> bool:
            listing = await api(relay, "GET", path, params={"status": "delivered"})
            return len(listing["items"]) == len(LIFECYCLE_CHANGES)

        await until(all_written)  # no attempt is under way: none can repeat one
        assert len(got.at("/hook", delivered=False)) == len(LIFECYCLE_CHANGES)
    listing = await api(relay, "GET", path)
    assert {d["status"] for d in listing["items"]} == {"delivered"}
    assert "secret" not in (await api(relay, "GET", f"/v1/subscriptions/{created['id']}"))


def fail_twice(receipt: Receipt, seen: int) -> web.Response:
    return web.Response(status=500, text="try again") if seen < 2 else web.Response(text="ok")


async def test_500_twice_then_200_is_delivered_on_the_third_attempt(
    start_relay: RelayFactory,
) -> None:
    """Two 500s are retried; the third attempt succeeds; every attempt has the same webhook-id."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        got.endpoint("/flaky", fail_twice)
        created = await subscribe(relay, got, "/flaky", types=["session.created"])
        await ingest(relay, fixture_events()[0])
        await eventually(lambda: len(got.at("/flaky")) == 1)
        all_attempts = got.at("/flaky", delivered=False)
        assert [r.status for r in all_attempts] == [500, 500, 200]
        assert len({r.message_id for r in all_attempts}) == 1
        assert all(r.verified for r in all_attempts)
    deliveries = await api(relay, "GET", f"/v1/subscriptions/{created['id']}/deliveries")
    [delivery] = deliveries["items"]
    assert delivery["status"] == "delivered"
    assert delivery["attempt_count"] == 3
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 200]
    assert delivery["attempts"][0]["response"] == "try again"
    assert all(a["latency_ms"] >= 0 for a in delivery["attempts"])
    one = await api(relay, "GET", f"/v1/deliveries/{delivery['id']}")
    assert one["attempts"] == delivery["attempts"]
    # the success ends the run of failures
    assert (await api(relay, "GET", f"/v1/subscriptions/{created['id']}"))["failing_since"] is None


@pytest.mark.parametrize("status", [429, 500])
async def test_retry_after_is_honoured(start_relay: RelayFactory, status: int) -> None:
    """A 429 or 500 with Retry-After: 1 delays the next attempt by a second, not the 50 ms
    schedule."""
    relay = await start_relay(delivery=FAST_DELIVERY)

    def busy_once(receipt: Receipt, seen: int) -> web.Response:
        if seen == 0:
            return web.Response(status=status, headers={"Retry-After": "1"})
        return web.Response(text="ok")

    async with receiver() as got:
        got.endpoint("/busy", busy_once)
        created = await subscribe(relay, got, "/busy", types=["session.created"])
        await ingest(relay, fixture_events()[0])
        await eventually(lambda: len(got.at("/busy")) == 1)
        first, second = got.at("/busy", delivered=False)
        assert (first.status, second.status) == (status, 200)
        assert 0.95 <= second.at - first.at < 3.0
    [delivery] = (await api(relay, "GET", f"/v1/subscriptions/{created['id']}/deliveries"))["items"]
    assert [a["status_code"] for a in delivery["attempts"]] == [status, 200]


async def test_400_fails_without_retry(start_relay: RelayFactory) -> None:
    """A 400 fails the delivery at once: one attempt, status failed, the reason recorded."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        got.endpoint("/bad", lambda r, seen: web.Response(status=400, text="no such thing"))
        created = await subscribe(relay, got, "/bad", types=["session.created"])
        await ingest(relay, fixture_events()[0])
        path = f"/v1/subscriptions/{created['id']}/deliveries"

        async def failed() -> list[Any]:
            items: list[Any] = (await api(relay, "GET", path, params={"status": "failed"}))["items"]
            return items

        async def settled() -> bool:
            return bool(await failed())

        await until(settled)  # failed is final: a retry would have kept it retrying
        assert len(got.at("/bad", delivered=False)) == 1
    [delivery] = await failed()
    assert delivery["attempt_count"] == 1
    assert delivery["last_status"] == 400
    assert delivery["attempts"][0]["response"] == "no such thing"
    assert "400" in delivery["last_error"]
    subscription = await api(relay, "GET", f"/v1/subscriptions/{created['id']}")
    assert subscription["enabled"] is True


async def test_410_disables_the_subscription_until_enabled(start_relay: RelayFactory) -> None:
    """A 410 disables the subscription (reason recorded); nothing more is sent until enable,
    which sends the changes made while it was disabled."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    gone = [True]

    def maybe_gone(receipt: Receipt, seen: int) -> web.Response:
        return web.Response(status=410) if gone[0] else web.Response(text="back")

    async with receiver() as got:
        got.endpoint("/gone", maybe_gone)
        created = await subscribe(relay, got, "/gone")
        sub_path = f"/v1/subscriptions/{created['id']}"
        events = fixture_events()
        await ingest(relay, events[0])

        async def disabled() -> bool:
            return (await api(relay, "GET", sub_path))["enabled"] is False

        await until(disabled)
        subscription = await api(relay, "GET", sub_path)
        assert subscription["enabled"] is False
        assert "410" in subscription["disabled_reason"]
        witnessed = await witness(relay, got)
        for event in events[1:]:
            await ingest(relay, event)
        await witnessed(len(LIFECYCLE_CHANGES) - 1)  # the dispatcher went past them all
        assert len(got.at("/gone", delivered=False)) == 1

        gone[0] = False
        enabled = await api(relay, "POST", f"{sub_path}/enable")
        assert enabled["enabled"] is True
        assert enabled["disabled_reason"] is None
        test = await api(relay, "POST", f"{sub_path}/test", status=202)
        await eventually(lambda: len(got.at("/gone")) == len(LIFECYCLE_CHANGES))
        received = {r.payload["type"]: r for r in got.at("/gone")}
        assert sorted(received) == sorted({*LIFECYCLE_CHANGES[1:], "webhook.test"})
        assert received["webhook.test"].message_id == f"msg_test_{test['id']}"
        assert all(r.verified for r in got.at("/gone"))
    failed = await api(relay, "GET", f"{sub_path}/deliveries", params={"status": "failed"})
    assert [a["status_code"] for a in failed["items"][0]["attempts"]] == [410]


async def test_failing_for_five_days_disables(start_relay: RelayFactory) -> None:
    """A subscription whose every attempt fails for five days (relay clock) is disabled."""
    offset = [0.0]
    relay = await start_relay(
        delivery={**FAST_DELIVERY, "retry_schedule_seconds": [0.05] * 20},
        clock=lambda: time.time() + offset[0],
    )
    async with receiver() as got:
        got.endpoint("/down", lambda r, seen: web.Response(status=503))
        created = await subscribe(relay, got, "/down", types=["session.created"])
        await ingest(relay, fixture_events()[0])
        await eventually(lambda: len(got.at("/down", delivered=False)) >= 2)
        assert (await api(relay, "GET", f"/v1/subscriptions/{created['id']}"))["enabled"]
        offset[0] = 5 * 86400 + 60
        sub_path = f"/v1/subscriptions/{created['id']}"

        async def disabled() -> bool:
            return (await api(relay, "GET", sub_path))["enabled"] is False

        await until(disabled)
        subscription = await api(relay, "GET", sub_path)
        assert subscription["enabled"] is False
        assert "5.0 days" in subscription["disabled_reason"]


async def test_rotated_secret_and_the_old_one_both_verify(start_relay: RelayFactory) -> None:
    """After rotate-secret each delivery verifies with the new and with the old secret."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        created = await subscribe(relay, got, "/rotating", types=["session.*"])
        rotated = await api(relay, "POST", f"/v1/subscriptions/{created['id']}/rotate-secret")
        assert rotated["secret"] != created["secret"]
        assert rotated["previous_secret_expires_at"] is not None
        events = fixture_events()
        await ingest(relay, events[0])
        await eventually(lambda: len(got.at("/rotating")) >= 1)
        receipt = got.at("/rotating")[0]
        assert len(receipt.headers["webhook-signature"].split()) == 2
        for secret in (created["secret"], rotated["secret"]):
            standardwebhooks.Webhook(secret).verify(receipt.body, receipt.headers)


def new_session(n: int) -> dict[str, Any]:
    """The fixture's session.created event for a session of its own."""
    event = fixture_events()[0]
    event["id"] = f"{event['id']}_{n}"
    event["data"]["chatId"] = f"chat_rotation_{n}"
    return event


async def test_each_rotated_out_secret_signs_until_its_own_end(start_relay: RelayFactory) -> None:
    """Two rotations a second apart: deliveries carry three signatures, each verifiable with
    its secret; after the overlap only the newest secret signs."""
    offset = [0.0]
    relay = await start_relay(
        delivery={**FAST_DELIVERY, "rotation_overlap_seconds": 30},
        clock=lambda: time.time() + offset[0],
    )
    async with receiver() as got:
        created = await subscribe(relay, got, "/rotating", types=["session.created"])
        path = f"/v1/subscriptions/{created['id']}/rotate-secret"
        first = await api(relay, "POST", path)
        offset[0] = 1.0
        second = await api(relay, "POST", path)
        await ingest(relay, new_session(1))
        await eventually(lambda: len(got.at("/rotating")) == 1)
        receipt = got.at("/rotating")[0]
        assert len(receipt.headers["webhook-signature"].split()) == 3
        for secret in (created["secret"], first["secret"], second["secret"]):
            standardwebhooks.Webhook(secret).verify(receipt.body, receipt.headers)

        offset[0] = 32.0  # both overlaps (30 s from each rotation) are over
        await ingest(relay, new_session(2))
        await eventually(lambda: len(got.at("/rotating")) == 2)
        receipt = got.at("/rotating")[1]
        assert len(receipt.headers["webhook-signature"].split()) == 1
        standardwebhooks.Webhook(second["secret"]).verify(receipt.body, receipt.headers)


async def test_concurrent_rotations_both_take_effect(start_relay: RelayFactory) -> None:
    """Two rotations at once both succeed and every secret they returned signs."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        created = await subscribe(relay, got, "/both", types=["session.created"])
        path = f"/v1/subscriptions/{created['id']}/rotate-secret"
        one, two = await asyncio.gather(api(relay, "POST", path), api(relay, "POST", path))
        await ingest(relay, new_session(3))
        await eventually(lambda: len(got.at("/both")) == 1)
        receipt = got.at("/both")[0]
        assert len(receipt.headers["webhook-signature"].split()) == 3
        for secret in (created["secret"], one["secret"], two["secret"]):
            standardwebhooks.Webhook(secret).verify(receipt.body, receipt.headers)


async def test_type_and_session_filters(start_relay: RelayFactory) -> None:
    """Type globs and session filters pick the changes a subscription gets."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        await subscribe(relay, got, "/turns", types=["turn.*"])
        await subscribe(relay, got, "/other", session_ids=["chat_someone_else"])
        witnessed = await witness(relay, got)
        for event in fixture_events():
            await ingest(relay, event)
        turns = [c for c in LIFECYCLE_CHANGES if c.startswith("turn.")]
        await eventually(lambda: len(got.at("/turns")) == len(turns))
        await witnessed(len(LIFECYCLE_CHANGES))  # the dispatcher went past every change
        assert sorted(r.payload["type"] for r in got.at("/turns")) == sorted(turns)
        assert got.at("/other", delivered=False) == []


async def test_manual_retry_and_recover_redeliver_failed_deliveries(
    start_relay: RelayFactory,
) -> None:
    """Failed deliveries go again on retry (one) and on recover since a time (all)."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    answer = [400]
    async with receiver() as got:
        got.endpoint("/later", lambda r, seen: web.Response(status=answer[0]))
        created = await subscribe(relay, got, "/later")
        sub_path = f"/v1/subscriptions/{created['id']}"
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
        for event in fixture_events():
            await ingest(relay, event)
        count = len(LIFECYCLE_CHANGES)
        await eventually(lambda: len(got.at("/later", delivered=False)) == count)

        async def all_failed() -> bool:
            found = await api(relay, "GET", f"{sub_path}/deliveries", params={"status": "failed"})
            return len(found["items"]) == count

        await until(all_failed)
        failed = await api(relay, "GET", f"{sub_path}/deliveries", params={"status": "failed"})

        answer[0] = 200
        first = failed["items"][0]
        retried = await api(relay, "POST", f"/v1/deliveries/{first['id']}/retry", status=202)
        assert retried["status"] == "pending"
        await eventually(lambda: len(got.at("/later")) == 1)
        assert got.at("/later")[0].change_id == first["change_id"]

        recovered = await api(
            relay, "POST", f"{sub_path}/recover", status=202, json={"since": since}
        )
        assert recovered == {"queued": count - 1}
        await eventually(lambda: len(got.at("/later")) == count)
        assert sorted(r.change_id for r in got.at("/later")) == sorted(
            d["change_id"] for d in failed["items"]
        )
    delivered = await api(relay, "GET", f"{sub_path}/deliveries", params={"status": "delivered"})
    assert len(delivered["items"]) == count


async def test_recover_includes_alerts_fired_since_with_no_event_after_them(
    start_relay: RelayFactory,
) -> None:
    """Recover since a time queues the alerts fired since then even when no event came after
    them, and not the changes of events received before that time."""
    relay = await start_relay(
        delivery=FAST_DELIVERY,
        alerts={"ready_timeout_seconds": 0.3, "check_interval_seconds": 0.05},
    )
    async with receiver() as got:
        await ingest(relay, fixture_events()[0])
        await asyncio.sleep(0.05)
        since = datetime.now(UTC).isoformat()

        async def alerted() -> bool:
            changes = await api(relay, "GET", "/v1/changes")
            return any(c["type"] == "session.ready_timeout" for c in changes["items"])

        await until(alerted)
        created = await subscribe(relay, got, "/late")
        recovered = await api(
            relay,
            "POST",
            f"/v1/subscriptions/{created['id']}/recover",
            status=202,
            json={"since": since},
        )
        assert recovered == {"queued": 1}
        await eventually(lambda: len(got.at("/late")) == 1)
        assert got.at("/late")[0].payload["type"] == "session.ready_timeout"


async def test_raw_changes_are_delivered_with_their_events(start_relay: RelayFactory) -> None:
    """A subscription to raw.* gets each stored event in its raw change, which the log keeps
    only as a reference to the event's row."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    events = fixture_events()
    async with receiver() as got:
        await subscribe(relay, got, "/raw", types=["raw.*"])
        for event in events:
            await ingest(relay, event)
        await eventually(lambda: len(got.at("/raw")) == len(events))
        receipts = sorted(got.at("/raw"), key=lambda r: r.change_id)
    assert all(r.verified for r in receipts)
    assert [r.payload["data"]["event"] for r in receipts] == events
    assert [r.payload["type"] for r in receipts] == [f"raw.{e['type']}" for e in events]
    listed = await api(relay, "GET", "/v1/changes?type=raw.*&limit=100")
    assert [r.payload["data"] for r in receipts] == listed["items"]
