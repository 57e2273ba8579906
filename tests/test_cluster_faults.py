"""Cluster mode under faults: an instance SIGKILLed, Redis stopped, PostgreSQL cut off.
Every test runs real `relay serve` processes on one fresh database."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
import orjson
import pytest
from aiohttp import web
from httpx_sse import aconnect_sse

from relay.timefmt import format_time, utcnow
from relay.webhooks.postgres_queue import LIVENESS_LOCK
from tests.cluster_support import (
    Node,
    Sent,
    cluster_config,
    lifecycle_events,
    paged,
    send_spread,
    wait_until,
)
from tests.conftest import SECRET
from tests.receivers import Receipt, receiver
from tests.redis_server import RedisServer
from tests.tcp_proxy import TcpProxy

FAST_DELIVERY = """
[delivery]
allow_private_networks = true
poll_interval_seconds = 0.2
retry_schedule_seconds = [0.2, 0.5, 1]
"""


async def prepared(nodes: list[Node]) -> str:
    """Migrate the shared database; return an admin key made for the test."""
    nodes[0].cli("migrate")
    made = nodes[0].cli("keys", "create", "--scope", "agent:read", "--scope", "agent:write")
    return made.strip().splitlines()[-1]


@contextlib.asynccontextmanager
async def stopped_after(nodes: list[Node]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await asyncio.gather(*(node.stop() for node in nodes))


async def post(url: str, key: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http,
        http.post(url + path, json=body) as resp,
    ):
        assert resp.status in (200, 201), await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


def bodies_of(events: list[dict[str, Any]]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


async def test_sigkill_of_one_instance_loses_no_event_and_no_delivery(
    tmp_path: Path, pg_url: str, redis_namespace: tuple[str, str]
) -> None:
    """One of two instances SIGKILLed under ingest load: every acknowledged event is
    stored once, and the deliveries it was attempting are made by the other instance
    once their lease ends."""
    hub_url, prefix = redis_namespace
    lease = 8 + 1  # delivery.timeout_seconds + delivery.lease_margin_seconds
    extra = FAST_DELIVERY + "timeout_seconds = 8\nlease_margin_seconds = 1\n"
    config = cluster_config(tmp_path, pg_url, hub_url, prefix, SECRET, extra)
    doomed, survivor = Node(config, tmp_path, "doomed"), Node(config, tmp_path, "survivor")
    key = await prepared([doomed])
    released = asyncio.Event()

    async def held(receipt: Receipt, seen: int) -> web.Response:
        if not released.is_set():
            await released.wait()  # an attempt in flight until the kill
        return web.Response(text="thanks")

    events = lifecycle_events(1200, seed=4)
    bodies = bodies_of(events)
    async with stopped_after([doomed, survivor]), receiver() as got:
        await doomed.start()
        sub = await post(
            doomed.url,
            key,
            "/v1/subscriptions",
            {"url": got.endpoint("/hooks", held), "max_in_flight": 4},
        )
        got.secrets["/hooks"] = sub["secret"]
        # Only the doomed instance runs: the first deliveries are its own, held in flight.
        first = await send_spread([doomed.url], SECRET, bodies[:20], clients=4)
        assert len(first.acked) == 20
        await wait_until(_at_least(lambda: len(got.receipts), 4), 30, "4 attempts in flight")
        in_flight = {r.message_id: r.at for r in got.receipts}
        assert len(in_flight) == 4

        await survivor.start()
        sent = Sent(acked=dict(first.acked))
        load = asyncio.create_task(
            send_spread([doomed.url, survivor.url], SECRET, bodies[20:], 16, sent)
        )
        await wait_until(_at_least(lambda: len(sent.acked), 200), 30, "200 events acknowledged")
        await doomed.kill()
        killed_at = time.time()
        acked_before_kill = set(sent.acked)
        released.set()
        await asyncio.wait_for(load, 60)

        stored = {e["id"] for e in await paged(survivor.url, key, "/v1/events")}
        assert acked_before_kill <= stored
        assert set(sent.acked) <= stored
        # The senders retry what was not acknowledged; then every event is there once.
        missing = [b for b, e in zip(bodies, events, strict=True) if e["id"] not in sent.acked]
        await send_spread([survivor.url], SECRET, missing, 8, sent)
        final = [e["id"] for e in await paged(survivor.url, key, "/v1/events")]
        assert len(final) == len(set(final)) == len(events)

        changes = {c["id"] for c in await paged(survivor.url, key, "/v1/changes")}

        def after_kill() -> set[int]:
            return {r.change_id for r in got.receipts if r.at > killed_at}

        await wait_until(_at_least(lambda: len(after_kill()), len(changes)), 45, "delivered")
        assert after_kill() == changes
        again = [r for r in got.receipts if r.message_id in in_flight and r.at > killed_at]
        assert {r.message_id for r in again} == set(in_flight)
        for receipt in again:  # taken over once the doomed instance's lease ended
            assert receipt.at - in_flight[receipt.message_id] >= lease - 1


def _at_least(count: Any, target: int) -> Any:
    async def check() -> bool:
        return bool(count() >= target)

    return check


def alerting_session(session: str, at: str) -> list[bytes]:
    """A session that becomes ready and starts a turn that never ends."""
    return [
        orjson.dumps({"id": f"{session}_{n}", "type": t, "occurred_at": at, "data": data})
        for n, (t, data) in enumerate(
            [
                ("agent.chat.session.created", {"chatId": session}),
                ("agent.worker.ready", {"chatId": session}),
                ("agent.chat.turn.started", {"chatId": session, "turnId": "turn_1"}),
            ]
        )
    ]


async def stalled(url: str, key: str) -> Counter[str]:
    """How many `turn.stalled` alerts each session has."""
    changes = await paged(url, key, "/v1/changes", type="turn.stalled")
    return Counter(c["session_id"] for c in changes)


async def test_alerts_fire_once_across_instances_also_when_one_is_killed(
    tmp_path: Path, pg_url: str, redis_namespace: tuple[str, str]
) -> None:
    """Stalled turns ingested through two instances each fire one alert; those ingested
    through an instance killed before they are due are fired once by the other."""
    hub_url, prefix = redis_namespace
    extra = "[alerts]\nturn_stall_seconds = 2\ncheck_interval_seconds = 0.1\n"
    config = cluster_config(tmp_path, pg_url, hub_url, prefix, SECRET, extra)
    first, second = Node(config, tmp_path, "first"), Node(config, tmp_path, "second")
    key = await prepared([first])
    async with stopped_after([first, second]):
        await asyncio.gather(first.start(), second.start())
        now = format_time(utcnow())
        both = [b for n in range(30) for b in alerting_session(f"chat_both_{n}", now)]
        sent = await send_spread([first.url, second.url], SECRET, both, clients=8)
        assert len(sent.acked) == len(both)

        async def all_fired(sessions: int, prefix: str) -> bool:
            fired = await stalled(second.url, key)
            return sum(1 for s in fired if s.startswith(prefix)) >= sessions

        await wait_until(lambda: all_fired(30, "chat_both_"), 60, "30 alerts")

        # Ingested through `first` only, which dies before any is due.
        now = format_time(utcnow())
        orphans = [b for n in range(30) for b in alerting_session(f"chat_orphan_{n}", now)]
        sent = await send_spread([first.url], SECRET, orphans, clients=8)
        assert len(sent.acked) == len(orphans)
        await first.kill()
        await wait_until(lambda: all_fired(30, "chat_orphan_"), 60, "30 orphaned alerts")

        # A later alert is the marker that every check before it has run.
        marker = alerting_session("chat_marker", format_time(utcnow()))
        await send_spread([second.url], SECRET, marker, clients=1)
        await wait_until(lambda: all_fired(1, "chat_marker"), 60, "the marker's alert")
        fired = await stalled(second.url, key)
        assert len(fired) == 61
        assert set(fired.values()) == {1}


async def follow_resuming(
    url: str, key: str, into: list[int], ready: asyncio.Event, ends: list[float]
) -> None:
    """Collect change ids from an SSE stream, resuming with Last-Event-ID whenever the
    stream ends; `ends` gets the time of each end."""
    headers = {"Authorization": f"Bearer {key}"}
    while True:
        resume = {"Last-Event-ID": str(into[-1])} if into else {}
        try:
            async with (
                httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(10, read=30)) as http,
                aconnect_sse(http, "GET", url + "/v1/stream", headers=resume) as source,
            ):
                ready.set()
                async for sse in source.aiter_sse():
                    if sse.id and not sse.event.startswith("stream."):
                        into.append(int(sse.id))
        except httpx.HTTPError:
            pass
        ends.append(time.time())
        await asyncio.sleep(0.1)


async def test_redis_down_for_five_seconds_under_load(tmp_path: Path, pg_url: str) -> None:
    """With Redis stopped for 5 s under load, ingest keeps answering 2xx and a stream on
    the other instance goes on (or resumes) with every change once, in order."""
    redis = RedisServer(tmp_path)
    await redis.start()
    config = cluster_config(tmp_path, pg_url, redis.url, "faults", SECRET)
    ingesting, streaming = Node(config, tmp_path, "ingesting"), Node(config, tmp_path, "streaming")
    key = await prepared([ingesting])
    bodies = bodies_of(lifecycle_events(900, seed=7))
    try:
        async with stopped_after([ingesting, streaming]):
            await asyncio.gather(ingesting.start(), streaming.start())
            ids: list[int] = []
            ready, ends = asyncio.Event(), []
            follower = asyncio.create_task(follow_resuming(streaming.url, key, ids, ready, ends))
            await asyncio.wait_for(ready.wait(), 30)
            sent = Sent()
            load = asyncio.create_task(
                send_spread([ingesting.url], SECRET, bodies, clients=4, sent=sent, pace=0.02)
            )
            await wait_until(_at_least(lambda: len(sent.acked), 100), 30, "100 acknowledged")
            redis.stop()
            during = len(sent.acked)
            await asyncio.sleep(5)  # the outage itself
            assert len(sent.acked) > during + 50, "ingest stalled while Redis was down"
            await redis.start()
            await asyncio.wait_for(load, 60)
            assert set(sent.statuses) == {202}
            changes = [c["id"] for c in await paged(ingesting.url, key, "/v1/changes")]
            try:
                await wait_until(_at_least(lambda: len(ids), len(changes)), 30, "streamed")
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            assert ids == changes
    finally:
        redis.stop()


async def liveness_locks(pg_url: str, count: int) -> bool:
    """Whether `count` instances hold their liveness lock on the database."""
    conn = await asyncpg.connect(pg_url)
    try:
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid::bigint = $1 AND objsubid = 2"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            LIVENESS_LOCK,
        )
    finally:
        await conn.close()
    return bool(held == count)


@pytest.mark.parametrize("fault", ["cut", "freeze"])
async def test_postgresql_cut_off_answers_503_and_recovers(
    tmp_path: Path, pg_url: str, redis_namespace: tuple[str, str], fault: str
) -> None:
    """PostgreSQL unreachable (connections dropped, or a silent partition): ingest
    answers 503 STORE_UNAVAILABLE with Retry-After, /readyz says not ready, nothing
    uncommitted is acknowledged; once it is back the relay ingests and answers ready."""
    hub_url, prefix = redis_namespace
    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    head, _, database = pg_url.rpartition("/")
    via_proxy = f"{head.rsplit('@', 1)[0]}@127.0.0.1:{proxy.port}/{database}"
    direct = cluster_config(tmp_path, pg_url, hub_url, prefix, SECRET)
    key = await prepared([Node(direct, tmp_path, "admin")])  # the CLI blocks this loop
    proxied = tmp_path / "proxied"
    proxied.mkdir()
    timeout = "timeout_seconds = 2"
    config = cluster_config(proxied, via_proxy, hub_url, prefix, SECRET, store=timeout)
    node = Node(config, proxied, "relay")
    events = lifecycle_events(1500, seed=9)
    bodies = bodies_of(events)
    try:
        async with stopped_after([node]), aiohttp.ClientSession() as http:
            await node.start()
            streamed: list[int] = []
            following, ends = asyncio.Event(), []
            follower = asyncio.create_task(
                follow_resuming(node.url, key, streamed, following, ends)
            )
            await asyncio.wait_for(following.wait(), 30)
            sent = Sent()
            load = asyncio.create_task(
                send_spread([node.url], SECRET, bodies, clients=8, sent=sent, pace=0.01)
            )
            await wait_until(_at_least(lambda: len(sent.acked), 100), 30, "100 acknowledged")
            proxy.cut() if fault == "cut" else proxy.freeze()
            answered = len(sent.statuses)

            async def refused() -> bool:
                return sent.statuses[answered:].count(503) >= 20

            await wait_until(refused, 60, "503 while cut off")
            async with http.get(node.url + "/readyz") as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"]
                assert (await resp.json())["error"]["code"] == "STORE_UNAVAILABLE"
            assert all(sent.retry_after), "a 503 without Retry-After"
            acked_while_cut = len(sent.acked)
            proxy.restore()

            async def ready() -> bool:
                async with http.get(node.url + "/readyz") as resp:
                    return resp.status == 200

            await wait_until(ready, 30, "ready again")
            # The instance holds its liveness lock again (or another that starts would
            # take its deliveries over while it attempts them).
            await wait_until(lambda: liveness_locks(pg_url, 1), 30, "liveness lock retaken")
            await asyncio.wait_for(load, 90)
            assert len(sent.acked) > acked_while_cut, "no ingest after PostgreSQL came back"
            assert set(sent.statuses) <= {200, 202, 503}

            stored = {e["id"] for e in await paged(node.url, key, "/v1/events")}
            assert set(sent.acked) <= stored  # nothing acknowledged that was not committed
            missing = [b for b, e in zip(bodies, events, strict=True) if e["id"] not in stored]
            retried = await send_spread([node.url], SECRET, missing, clients=8)
            assert set(retried.statuses) <= {200, 202}
            final = [e["id"] for e in await paged(node.url, key, "/v1/events")]
            assert len(final) == len(set(final)) == len(events)
            # Full service: the stream has every change once, in order (resumed if it
            # ended), and the derived state is right.
            changes = [c["id"] for c in await paged(node.url, key, "/v1/changes")]
            try:
                await wait_until(_at_least(lambda: len(streamed), len(changes)), 30, "streamed")
            finally:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            assert streamed == changes
            await proxy.stop()  # the CLI blocks this loop: it goes to PostgreSQL directly
            assert "match the events" in Node(direct, tmp_path, "admin").cli("check-state")
    finally:
        await proxy.stop()
