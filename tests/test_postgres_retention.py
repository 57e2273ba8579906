"""Retention on the PostgreSQL store: bounded rows, live sessions kept, one pruner at a time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from relay.config import AlertSettings, RetentionSettings, StoreSettings
from relay.store import Store, open_store
from relay.store.postgres_retention import RETENTION_LOCK, prune_batch
from relay.timefmt import format_unix
from tests.conftest import RelayFactory
from tests.receivers import FAST_DELIVERY, eventually, receiver, subscribe, until
from tests.test_hardening_store import ingest_session, resume_from_a_pruned_id_resets
from tests.test_store_contract import body, lifecycle, rec

OLD_EVENTS = "SELECT count(*) FROM events WHERE received_at < $1"


@asynccontextmanager
async def opened(url: str, **retention: float) -> AsyncIterator[Store]:
    """A PostgreSQL store on `url`, pruning with the given retention settings (if any)."""
    settings = RetentionSettings(**retention) if retention else None  # type: ignore[arg-type]
    store = open_store(StoreSettings(url=url), None, AlertSettings(), settings)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def count(url: str, sql: str, *args: object) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


async def ingest(store: Store, session: str, turns: int = 2) -> None:
    await store.ingest_many([rec(raw) for raw in lifecycle(session, turns)])


async def test_rows_stay_bounded_under_steady_ingest(pg_url: str) -> None:
    """With a one-second retention, nothing older than two seconds stays while ingest goes on."""
    async with opened(
        pg_url, seconds=1.0, interval_seconds=0.1, batch_rows=500, batch_pause_seconds=0.02
    ) as store:
        started = time.monotonic()
        sessions = 0
        samples: list[tuple[int, int, int, int]] = []
        while time.monotonic() - started < 5.0:
            await ingest(store, f"chat_{sessions:05d}")
            sessions += 1
            if time.monotonic() - started > 3.0:  # every second of ingest was pruned once
                old = format_unix(time.time() - 2.0)
                samples.append(
                    (
                        await count(pg_url, OLD_EVENTS, old),
                        await count(pg_url, "SELECT count(*) FROM events"),
                        await count(pg_url, "SELECT count(*) FROM changes"),
                        await count(pg_url, "SELECT count(*) FROM session_facts"),
                    )
                )
    assert samples, "ingest was too slow to sample"
    assert all(old == 0 for old, _, _, _ in samples), samples
    for _, events, changes, facts in samples:
        assert changes <= 3 * events + 3
        assert facts <= events


async def test_live_sessions_keep_state_and_events_quiet_ones_go(pg_url: str) -> None:
    """A session with recent activity keeps its state and every event; a quiet one is pruned.

    The window is 3 s: with 1 s, a loaded machine (the writer process starting, other
    tests) let more than a second pass between the live session's first events and its
    next ones, and the session was rightly pruned as quiet in between."""
    async with opened(pg_url, seconds=3.0, interval_seconds=0.05, batch_rows=100) as store:
        await ingest(store, "chat_live")
        await ingest(store, "chat_quiet")
        turns = [0]

        async def quiet_one_pruned() -> bool:
            turns[0] += 1
            turn = f"turn_live_{turns[0]}"
            await store.ingest_many(
                [
                    rec(body(f"live-{turns[0]}s", "agent.chat.turn.started", "chat_live", turn)),
                    rec(body(f"live-{turns[0]}e", "agent.chat.turn.completed", "chat_live", turn)),
                ]
            )
            return await store.get_session("chat_quiet") is None

        await until(quiet_one_pruned)
        live = await store.get_session("chat_live")
        assert live is not None
        assert orjson.loads(live.snapshot)["readiness"] == "ready"
        first = await store.list_session_events("chat_live", 0, 1)
        assert first[0].id == "chat_live-c"

        async def consistent() -> bool:  # the quiet session's events go in the same passes
            return await store.check_derived_state() == []

        await until(consistent)
        assert await store.list_session_events("chat_quiet", 0, 1) == []


async def test_resume_from_a_pruned_change_finds_the_oldest_id_moved(pg_url: str) -> None:
    """Once changes are pruned, the oldest change the read API gives is past them."""
    async with opened(pg_url, seconds=0.5, interval_seconds=0.05, batch_rows=100) as store:
        await ingest(store, "chat_first")
        first_ids = [change.id for change in await store.list_changes(0, 100)]
        later = [0]

        async def pruned() -> bool:
            later[0] += 1
            await ingest(store, f"chat_later_{later[0]}")
            return (await store.list_changes(0, 1))[0].id > max(first_ids)

        await until(pruned)
        newest = await store.last_change_id()
        assert newest > max(first_ids)
        assert await store.list_changes(first_ids[0], 1) == await store.list_changes(0, 1)


async def test_sse_resume_from_a_pruned_change_gets_stream_reset(
    pg_url: str, start_relay: RelayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay on PostgreSQL answers a resume from a pruned id with stream.reset first."""
    monkeypatch.chdir(tmp_path)  # the relay's own files go to ./data beside a server store
    relay = await start_relay(
        store={"url": pg_url},
        retention={"seconds": 0.5, "interval_seconds": 0.05, "batch_rows": 100},
    )
    await resume_from_a_pruned_id_resets(relay)


async def test_a_batch_prunes_nothing_while_another_instance_holds_the_lock(
    pg_url: str,
) -> None:
    """While another connection holds the retention lock a batch deletes nothing; after, it does."""
    async with opened(pg_url) as store:
        for n in range(3):
            await ingest(store, f"chat_{n}")
        await store.ingest(rec(body("newest", "agent.chat.session.created", "chat_newest")))
    events = await count(pg_url, "SELECT count(*) FROM events")
    holder = await asyncpg.connect(pg_url)
    pruner = await asyncpg.connect(pg_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock($1)", RETENTION_LOCK)
            assert await prune_batch(pruner, time.time() + 10, 100) is None
            assert await count(pg_url, "SELECT count(*) FROM events") == events
        pruned = await prune_batch(pruner, time.time() + 10, 100)
    finally:
        await holder.close()
        await pruner.close()
    assert pruned is not None
    assert pruned.rows > 0
    assert await count(pg_url, "SELECT count(*) FROM events") == 1  # the newest stays
    assert await count(pg_url, "SELECT count(*) FROM changes") == 1


async def test_two_instances_prune_beside_ingest_without_deadlock(pg_url: str) -> None:
    """Two instances ingesting into shared sessions and both pruning meet no deadlock or
    failure, keep rows bounded and leave derived state that a replay agrees with."""
    retention = {
        "seconds": 0.5,
        "interval_seconds": 0.02,
        "batch_rows": 20,
        "batch_pause_seconds": 0.01,
    }
    with capture_logs() as logs:
        async with opened(pg_url, **retention) as one, opened(pg_url, **retention) as two:

            async def steady(store: Store, name: str) -> None:
                started = time.monotonic()
                n = 0
                while time.monotonic() - started < 3.0:
                    n += 1
                    await ingest(store, f"chat_{name}_{n}", turns=1)
                    turn = f"turn_{name}_{n}"  # one session both instances keep writing
                    await store.ingest(
                        rec(body(f"{name}-{n}", "agent.chat.turn.started", "chat_shared", turn))
                    )

            await asyncio.gather(steady(one, "a"), steady(two, "b"))
            old = format_unix(time.time() - 1.5)

            seen: list[object] = []

            async def caught_up() -> bool:
                seen[:] = [await count(pg_url, OLD_EVENTS, old)]
                if seen[0] == 0:
                    seen.append(await one.check_derived_state())
                return seen == [0, []]

            try:
                await until(caught_up, within=60)
            except AssertionError:
                raise AssertionError(f"old events left, replay differences: {seen}") from None
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
    deadlocks = await count(
        pg_url, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    )
    assert deadlocks == 0


async def test_a_session_pruned_and_begun_again_is_not_read_from_a_stale_cache(
    pg_url: str,
) -> None:
    """An instance that cached a session pruned since derives from the new session's facts."""
    async with opened(pg_url) as one, opened(pg_url) as two:
        await one.ingest(rec(body("s-c", "agent.chat.session.created", "chat_s")))
        await one.ingest(rec(body("other", "agent.chat.session.created", "chat_other")))
        pruned = await two.prune(time.time() + 10, 100)
        assert "chat_s" in pruned.sessions
        await two.ingest(rec(body("s-1s", "agent.chat.turn.started", "chat_s", "turn_1")))
        await one.ingest(rec(body("s-1e", "agent.chat.turn.completed", "chat_s", "turn_1")))
        turns = [orjson.loads(snapshot) for _, snapshot in await one.list_turns("chat_s", 0, 10)]
        assert [(t["turn_id"], t["status"]) for t in turns] == [("turn_1", "completed")]
        assert await one.check_derived_state() == []


async def test_finished_deliveries_and_attempts_are_pruned(
    pg_url: str, start_relay: RelayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL, deliveries made and their attempts go once older than the retention."""
    monkeypatch.chdir(tmp_path)
    relay = await start_relay(
        store={"url": pg_url},
        delivery=FAST_DELIVERY,
        retention={"seconds": 1.0, "interval_seconds": 0.05, "batch_rows": 100},
    )
    async with receiver() as got:
        await subscribe(relay, got, "/hook", types=["session.*"])
        await ingest_session(relay, 0)
        await eventually(lambda: len(got.at("/hook")) >= 3)

        async def attempts_logged() -> bool:
            return await count(pg_url, "SELECT count(*) FROM delivery_attempts") >= 3

        await until(attempts_logged)
        later = [0]

        async def pruned() -> bool:
            later[0] += 1
            await ingest_session(relay, later[0])  # keeps deliveries (and time) going
            first_session = await count(
                pg_url, "SELECT count(*) FROM deliveries WHERE session_id = 'chat_ret_00000'"
            )
            old_attempts = await count(
                pg_url, "SELECT count(*) FROM delivery_attempts WHERE at < $1", time.time() - 2.0
            )
            return first_session == 0 and old_attempts == 0

        await until(pruned)


async def test_a_change_a_delivery_still_has_to_send_stays(
    pg_url: str, start_relay: RelayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changes before a delivery that keeps retrying are pruned; it and those after stay."""
    monkeypatch.chdir(tmp_path)
    relay = await start_relay(
        store={"url": pg_url},
        delivery={**FAST_DELIVERY, "retry_schedule_seconds": [60.0]},
        retention={"seconds": 0.5, "interval_seconds": 0.05, "batch_rows": 100},
    )
    await ingest_session(relay, 0)  # before the subscription: nothing to send
    async with receiver() as got:
        got.endpoint("/down", lambda receipt, seen: web.Response(status=503))
        await subscribe(relay, got, "/down", types=["session.created"])
        await ingest_session(relay, 1)
        await eventually(lambda: len(got.at("/down", delivered=False)) >= 1)
        held = got.at("/down", delivered=False)[0].change_id
        later = [1]

        async def first_session_pruned() -> bool:
            later[0] += 1
            await ingest_session(relay, later[0])
            resp = await relay.client.get(
                "/v1/changes", params={"after": 0, "limit": 1}, headers=relay.auth
            )
            return bool((await resp.json())["items"][0]["session_id"] != "chat_ret_00000")

        await until(first_session_pruned)
        resp = await relay.client.get(
            "/v1/changes", params={"after": 0, "limit": 1}, headers=relay.auth
        )
        assert (await resp.json())["items"][0]["id"] <= held
        resp = await relay.client.get(
            "/v1/changes", params={"after": held - 1, "limit": 1}, headers=relay.auth
        )
        assert (await resp.json())["items"][0]["id"] == held
