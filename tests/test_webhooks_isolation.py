"""One bad endpoint never delays another; session ordering holds through retries."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import defaultdict
from typing import Any

import orjson
from aiohttp import web

from tests.conftest import LIFECYCLE_CHANGES, RelayFactory, fixture_events
from tests.receivers import FAST_DELIVERY, Receipt, eventually, receiver, subscribe
from tests.test_ingest import signed

SESSIONS = 20


def lifecycles(sessions: int) -> list[list[dict[str, Any]]]:
    """The fixture lifecycle for `sessions` distinct sessions (ids made unique)."""
    out = []
    for n in range(sessions):
        events = fixture_events()
        for event in events:
            event["id"] = f"{event['id']}_{n}"
            event["data"]["chatId"] = f"chat_iso_{n}"
        out.append(events)
    return out


async def test_dead_and_failing_endpoints_do_not_delay_a_healthy_one(
    start_relay: RelayFactory,
) -> None:
    """Beside an endpoint that never answers and one that answers 500, a healthy one gets
    every change, none held for the dead one's timeout (the bench measures latency)."""
    relay = await start_relay(delivery={**FAST_DELIVERY, "timeout_seconds": 5})
    never = asyncio.Event()

    async def hang(receipt: Receipt, seen: int) -> web.Response:
        await never.wait()
        return web.Response()

    acked: dict[str, float] = {}
    async with receiver() as got:
        got.endpoint("/dead", hang)
        got.endpoint("/failing", lambda r, seen: web.Response(status=500))
        for path in ("/dead", "/failing", "/healthy"):
            await subscribe(relay, got, path)
        for round_events in zip(*lifecycles(SESSIONS), strict=True):
            for event in round_events:
                body = orjson.dumps(event)
                resp = await relay.client.post(
                    "/v1/ingest/casedev", data=body, headers=signed(body)
                )
                assert resp.status == 202
                acked[event["id"]] = time.time()
            await asyncio.sleep(0.02)
        expected = SESSIONS * len(LIFECYCLE_CHANGES)
        await eventually(lambda: len(got.at("/healthy")) == expected)
        healthy = got.at("/healthy")
        assert len({r.change_id for r in healthy}) == expected
        latencies = sorted(r.at - acked[r.payload["data"]["cause"]["event_id"]] for r in healthy)
        p99 = latencies[math.ceil(len(latencies) * 0.99) - 1]
        assert p99 < 2.5, f"p99 {p99 * 1000:.0f} ms"  # half the dead endpoint's timeout
        assert len(got.at("/dead", delivered=False)) >= 10  # it was tried, and held its slots
        assert len(got.at("/failing", delivered=False)) >= expected
        never.set()


async def test_session_ordering_holds_through_retries(start_relay: RelayFactory) -> None:
    """With ordering "session" and a receiver failing a third of attempts, each session's
    changes arrive in id order: none is attempted before the previous one was delivered."""
    relay = await start_relay(delivery={**FAST_DELIVERY, "retry_schedule_seconds": [0.02] * 30})
    rng = random.Random(5)

    def flaky(receipt: Receipt, seen: int) -> web.Response:
        return web.Response(status=500 if rng.random() < 0.33 else 200)

    async with receiver() as got:
        got.endpoint("/ordered", flaky)
        await subscribe(relay, got, "/ordered", ordering="session", max_in_flight=20)
        sessions = lifecycles(8)
        for round_events in zip(*sessions, strict=True):
            for event in round_events:
                body = orjson.dumps(event)
                resp = await relay.client.post(
                    "/v1/ingest/casedev", data=body, headers=signed(body)
                )
                assert resp.status == 202
        expected = len(sessions) * len(LIFECYCLE_CHANGES)
        await eventually(lambda: len(got.at("/ordered")) == expected, within=60)
        attempts: defaultdict[str, list[int]] = defaultdict(list)
        for receipt in got.at("/ordered", delivered=False):
            attempts[receipt.payload["data"]["session_id"]].append(receipt.change_id)
        assert len(attempts) == len(sessions)
        for ids in attempts.values():
            assert ids == sorted(ids), ids
        assert any(r.status == 500 for r in got.receipts)
