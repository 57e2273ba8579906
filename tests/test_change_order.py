"""The change log is one sequence across PostgreSQL writers: a reader paging by id sees
every change once, in order, even when writers pause between taking ids and committing.
With a plain SEQUENCE the same schedule makes the reader skip changes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson

from relay.config import AlertSettings, StoreSettings
from relay.state import derive_session
from relay.store import IngestRecord, Store, open_store
from relay.store.derive import ChangeDraft
from relay.store.postgres_writer import _append_changes
from tests.test_store_contract import body, lifecycle, rec

WRITERS = 4
ROUNDS = 4

# A writer's transaction: take ids and insert the changes, pause, commit.
Write = Callable[[asyncpg.Connection, int, int], Awaitable[None]]


async def _with_counter(conn: asyncpg.Connection, writer: int, count: int) -> None:
    """What the store does: ids from the counter row, locked until the commit."""
    drafts = [ChangeDraft("turn.started", f"chat_{writer}", None, None, {}) for _ in range(count)]
    await _append_changes(conn, drafts)


async def _with_sequence(conn: asyncpg.Connection, writer: int, count: int) -> None:
    """The naive way: ids from a SEQUENCE, taken by transactions that commit in any order."""
    await conn.execute(
        "INSERT INTO changes (id, type, session_id, body)"
        " SELECT nextval('naive_change_ids'), 'turn.started', $1, ''::bytea"
        " FROM generate_series(1, $2)",
        f"chat_{writer}",
        count,
    )


async def _scenario(url: str, write: Write) -> tuple[list[int], list[int]]:
    """Four writers, each pausing after taking its ids longer than the writers started
    after it (so without a lock later ids commit first), and a reader paging by id all
    along. Returns (ids the reader saw, in order; ids committed)."""
    conns = [await asyncpg.connect(url) for _ in range(WRITERS + 1)]
    done = asyncio.Event()
    seen: list[int] = []

    async def writer(index: int) -> None:
        conn = conns[index]
        for round_ in range(ROUNDS):
            await asyncio.sleep(0.01 * index)  # take ids in writer order...
            async with conn.transaction():
                await write(conn, index, 1 + (round_ + index) % 3)
                await asyncio.sleep(0.05 * (WRITERS - index))  # ...commit in reverse

    async def reader() -> None:
        after = 0
        while True:
            finished = done.is_set()
            rows = await conns[WRITERS].fetch(
                "SELECT id FROM changes WHERE id > $1 ORDER BY id LIMIT 3", after
            )
            seen.extend(row[0] for row in rows)
            if rows:
                after = rows[-1][0]
            elif finished:
                return
            else:
                await asyncio.sleep(0.002)

    try:
        reading = asyncio.create_task(reader())
        await asyncio.gather(*(writer(i) for i in range(WRITERS)))
        done.set()
        await reading
        committed = [row[0] for row in await conns[WRITERS].fetch("SELECT id FROM changes")]
    finally:
        for conn in conns:
            await conn.close()
    return seen, sorted(committed)


async def _migrated(url: str) -> None:
    store = open_store(StoreSettings(url=url))
    await store.migrate()
    await store.close()


async def test_a_reader_paging_by_id_sees_every_change_once_in_order(pg_url: str) -> None:
    """With ids from the locked counter row, a reader never passes an id that commits later."""
    await _migrated(pg_url)
    seen, committed = await _scenario(pg_url, _with_counter)
    assert committed == list(range(1, len(committed) + 1))
    assert seen == committed


async def test_a_plain_sequence_lets_a_reader_skip_changes(pg_url: str) -> None:
    """The same schedule with a SEQUENCE: later ids commit first and the reader, past them,
    never sees the earlier ones (which is why the store does not use one)."""
    await _migrated(pg_url)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("CREATE SEQUENCE naive_change_ids")
    finally:
        await conn.close()
    seen, committed = await _scenario(pg_url, _with_sequence)
    assert len(committed) == len(set(committed))
    missed = set(committed) - set(seen)
    assert missed, "every change was seen: the schedule did not commit out of id order"
    assert seen == sorted(seen)


def _open(url: str) -> Store:
    alerts = AlertSettings(turn_stall_seconds=600, ready_timeout_seconds=600)
    return open_store(StoreSettings(url=url, batch_max=8), None, alerts)


async def test_two_instances_derive_what_one_derives(pg_url: str) -> None:
    """Two stores on one database, ingesting the same sessions' events at once (shuffled,
    a quarter twice), store each event once and derive the state of a single writer."""
    sessions = {f"chat_{i}": lifecycle(f"chat_{i}", 3 + i % 4) for i in range(8)}
    raws = [raw for events in sessions.values() for raw in events]
    sent = raws + random.Random(11).sample(raws, len(raws) // 4)
    random.Random(5).shuffle(sent)
    first, second = _open(pg_url), _open(pg_url)
    await first.open()
    await second.open()
    try:
        warm = [first.ingest(rec(raw)) for raw in sent[:10]]  # both caches hold sessions
        await asyncio.gather(*warm, *(second.ingest(rec(raw)) for raw in sent[10:20]))
        records: list[IngestRecord] = [rec(raw) for raw in sent[20:]]
        results = await asyncio.gather(
            *((first if i % 2 else second).ingest(r) for i, r in enumerate(records))
        )
        assert sum(not r.duplicate for r in results) <= len(raws)
        events = await first.list_events(0, 10_000)
        assert sorted(e.id for e in events) == sorted(orjson.loads(raw)["id"] for raw in raws)
        for session_id, session_events in sessions.items():
            expected = derive_session(rec(raw).event for raw in session_events)
            assert expected is not None
            for store in (first, second):
                row = await store.get_session(session_id)
                assert row is not None
                got = orjson.loads(row.snapshot)
                want = expected.session.to_dict()
                assert _unversioned(got) == _unversioned(want)
                turns = [orjson.loads(s) for _, s in await store.list_turns(session_id, 0, 99)]
                assert {t["turn_id"]: _unversioned(t) for t in turns} == {
                    tid: _unversioned(t.to_dict()) for tid, t in expected.turns.items()
                }
        assert await first.check_derived_state() == []
        changes = await second.list_changes(0, 10_000, exclude=())
        assert [c.id for c in changes] == list(range(1, len(changes) + 1))
        raw_changes = [c for c in changes if c.type.startswith("raw.")]
        assert len(raw_changes) == len(raws)
    finally:
        await first.close()
        await second.close()


def _unversioned(snapshot: dict[str, object]) -> dict[str, object]:
    out = {k: v for k, v in snapshot.items() if k != "version"}
    last = out.get("last_turn")
    if isinstance(last, dict):
        out["last_turn"] = _unversioned(last)
    return out


async def test_alerts_fire_once_across_instances(pg_url: str) -> None:
    """Two instances firing due alerts at the same time fire each alert exactly once."""
    first, second = _open(pg_url), _open(pg_url)
    await first.open()
    await second.open()
    try:
        long_ago = datetime.now(UTC) - timedelta(hours=2)
        sent = []
        for i in range(20):
            session = f"chat_{i}"
            sent += [body(f"{session}-c", "agent.chat.session.created", session)]
            sent += [body(f"{session}-{t}", "agent.chat.turn.started", session, t) for t in "ab"]
        await asyncio.gather(
            *((first if i % 2 else second).ingest(rec(raw, long_ago)) for i, raw in enumerate(sent))
        )
        now = datetime.now(UTC).timestamp()
        fired = 0
        for _ in range(20):  # a run skips sessions the other holds: run until none is due
            counts = await asyncio.gather(*(s.fire_due_alerts(now) for s in (first, second) * 3))
            fired += sum(counts)
            if not any(counts) and fired:
                break
        alerts = await first.list_changes(0, 1000, ("turn.stalled", "session.ready_timeout"))
        keys = [(c.type, c.session_id, c.turn_id) for c in alerts]
        assert len(keys) == len(set(keys)) == fired == 60
    finally:
        await first.close()
        await second.close()
