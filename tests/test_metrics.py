"""/metrics: the listed metrics parse and move with ingests, changes and streams."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LIFECYCLE_CHANGES, Relay, RelayFactory, fixture_events
from tests.receivers import FAST_DELIVERY, eventually, receiver, subscribe
from tests.test_ingest import signed

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(relay: Relay) -> Samples:
    resp = await relay.client.get("/metrics")
    assert resp.status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
    }


async def test_state_metrics_follow_the_lifecycle(relay: Relay) -> None:
    """Changes by type, time to ready and turn durations move with the fixture lifecycle."""
    before = await scrape(relay)
    assert before[("relay_time_to_ready_seconds_count", ())] == 0
    for event in fixture_events():
        body = orjson.dumps(event)
        resp = await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
        assert resp.status == 202
    samples = await scrape(relay)
    for change_type, count in Counter(LIFECYCLE_CHANGES).items():
        assert samples[("relay_changes_total", (("type", change_type),))] == count
    assert samples[("relay_time_to_ready_seconds_count", ())] == 1
    assert samples[("relay_time_to_ready_seconds_sum", ())] == 2.1
    finished = {
        status: samples[("relay_turn_duration_seconds_count", (("status", status),))]
        for status in ("completed", "failed")
    }
    assert finished == {"completed": 1, "failed": 1}
    assert samples[("relay_turn_duration_seconds_sum", (("status", "completed"),))] > 0


async def test_sse_subscriber_gauge_counts_open_streams(relay: Relay) -> None:
    """relay_sse_subscribers counts open streams and drops when one closes."""
    assert (await scrape(relay))[("relay_sse_subscribers", ())] == 0
    stream = await relay.client.get("/v1/stream", headers=relay.auth)
    assert stream.status == 200
    await stream.content.readuntil(b"\n\n")  # the stream is live
    assert (await scrape(relay))[("relay_sse_subscribers", ())] == 1
    stream.close()
    for _ in range(1500):  # at least 30 s
        if (await scrape(relay))[("relay_sse_subscribers", ())] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await scrape(relay))[("relay_sse_subscribers", ())] == 0


async def test_delivery_metrics_move_with_deliveries(start_relay: RelayFactory) -> None:
    """Deliveries by outcome count each delivered change; the queue drains to zero."""
    relay = await start_relay(delivery=FAST_DELIVERY)
    async with receiver() as got:
        await subscribe(relay, got, "/hook")
        for event in fixture_events():
            body = orjson.dumps(event)
            await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
        await eventually(lambda: len(got.at("/hook")) == len(LIFECYCLE_CHANGES))
        for _ in range(1500):  # (>= 30 s) the queue depth is refreshed by the dispatcher's poll
            samples = await scrape(relay)
            delivered = samples.get(("relay_deliveries_total", (("outcome", "delivered"),)))
            depth = samples.get(("relay_delivery_queue_depth", ()))
            if delivered == len(LIFECYCLE_CHANGES) and depth == 0:
                break
            await asyncio.sleep(0.02)
    assert delivered == len(LIFECYCLE_CHANGES)
    assert depth == 0
