"""Costs at scale: what ingest and reads cost once the store holds many events.

Builds a store of realistic lifecycles through the store's batch path (large batches,
no HTTP): sessions are created, get their runtime and a worker ready (5% never do) and
run turns (5% never end); one session has 10,000 turns and one 5,000 turns that keep
running. Then prints, in one run, each figure beside its target:

- ingest of new sessions at full size relative to an empty store;
- the first event to the 10,000-turn session after a restart (its record not cached),
  and the p99 of everyone else's ingest meanwhile;
- per-event cost in the 5,000-running-turn session relative to a fresh session;
- a page of `/v1/sessions` and `/v1/changes` with a type that never occurs (p99, at the
  store), and a session stream's first change when resumed from the start of the log;
- bytes of store per event, and the writer process's memory.

`--events` sets the size (default 1,000,000); `--smoke` runs a small one. `--store
postgresql` runs the same against PostgreSQL (`--pg-url`, a database the run creates and
drops; the empty store is a second one): the store's bytes are `pg_database_size`, the
WAL's share does not apply, and the writer's memory is the relay process's (it derives
in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from relay.config import StoreSettings
from relay.normalize import decoder
from relay.sse import StreamFilter
from relay.store import IngestRecord, SessionQuery, Store
from relay.store.postgres import PostgresStore
from relay.store.sqlite import SQLiteStore

PROVIDERS = {"casedev": "casedev"}
T0 = datetime(2026, 11, 1, tzinfo=UTC)
TURNS_PER_SESSION = 8
BUILD_BATCH = 2_000


class Events:
    """Numbered Case.dev events, each made once as body and Event."""

    def __init__(self) -> None:
        self._decode = decoder(PROVIDERS)
        self._number = 0
        self.received = T0.isoformat()

    def make(self, kind: str, session: str, turn: str | None = None) -> IngestRecord:
        self._number += 1
        data: dict[str, Any] = {"chatId": session}
        if turn is not None:
            data["turnId"] = turn
        if kind == "agent.chat.turn.completed":
            data["usage"] = {"inputTokens": 120, "outputTokens": 40, "costMicros": 900}
        at = T0 + timedelta(milliseconds=self._number)
        body = orjson.dumps(
            {
                "id": f"evt_{self._number:09d}",
                "type": kind,
                "occurred_at": at.isoformat().replace("+00:00", "Z"),
                "data": data,
            }
        )
        event = self._decode("casedev", body, self.received)
        return IngestRecord(event, body, datetime.now(UTC))


def lifecycle(events: Events, session: str, turns: int, number: int) -> Iterator[IngestRecord]:
    """A session's events: 1 in 20 never becomes ready, 1 in 20 turns never ends."""
    yield events.make("agent.chat.session.created", session)
    yield events.make("agent.runtime.reused", session)
    if number % 20 == 7:
        return
    yield events.make("agent.worker.ready", session)
    for t in range(turns):
        turn = f"turn_{t}"
        yield events.make("agent.chat.turn.started", session, turn)
        if (number * turns + t) % 20 != 3:
            yield events.make("agent.chat.turn.completed", session, turn)


def long_session(events: Events, session: str, turns: int, end: bool) -> Iterator[IngestRecord]:
    yield events.make("agent.chat.session.created", session)
    yield events.make("agent.worker.ready", session)
    for t in range(turns):
        yield events.make("agent.chat.turn.started", session, f"turn_{t}")
        if end:
            yield events.make("agent.chat.turn.completed", session, f"turn_{t}")


def open_store(path: Path) -> SQLiteStore:
    return SQLiteStore(StoreSettings(url=f"sqlite:///{path}"), PROVIDERS, _alerts())


class SQLiteBackend:
    """Stores as files in the work directory: the full one and an empty one beside it."""

    def __init__(self, work: Path) -> None:
        self.work = work

    async def create(self) -> None:
        (self.work / "empty").mkdir(exist_ok=True)

    async def drop(self) -> None:
        pass

    def open(self, empty: bool = False) -> Store:
        return open_store(self.work / "empty" / "scale.db" if empty else self.work / "scale.db")

    async def size(self) -> int:
        return store_bytes(self.work)

    def wal_share(self, count: int) -> str:
        return f"{wal_bytes(self.work) / count:,.0f}"

    def writer_rss_mib(self, store: Store) -> float:
        assert isinstance(store, SQLiteStore)
        return writer_rss_mib(store)


class PostgresBackend:
    """Two databases made for the run (the full store and an empty one), dropped after."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.names = (f"relay_scale_{os.getpid()}", f"relay_scale_{os.getpid()}_empty")

    def _url(self, name: str) -> str:
        return f"{self.admin_url.rpartition('/')[0]}/{name}"

    async def _admin(self, statements: list[str]) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    async def create(self) -> None:
        await self._admin([f'CREATE DATABASE "{name}"' for name in self.names])

    async def drop(self) -> None:
        await self._admin([f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in self.names])

    def open(self, empty: bool = False) -> Store:
        url = self._url(self.names[1] if empty else self.names[0])
        return PostgresStore(StoreSettings(url=url), PROVIDERS, _alerts())

    async def size(self) -> int:
        conn = await asyncpg.connect(self._url(self.names[0]))
        try:
            size: int = await conn.fetchval("SELECT pg_database_size(current_database())")
        finally:
            await conn.close()
        return size

    def wal_share(self, count: int) -> str:
        return "n/a"

    def writer_rss_mib(self, store: Store) -> float:
        return rss_mib(os.getpid())  # the relay process derives in-process


Backend = SQLiteBackend | PostgresBackend


def _alerts() -> Any:
    from relay.config import AlertSettings

    return AlertSettings()


async def build(store: Store, events: Events, total: int, long_turns: int) -> int:
    """Fill the store with about `total` events; returns how many were written."""
    written = 0
    batch: list[IngestRecord] = []

    async def flush() -> None:
        nonlocal written, batch
        if batch:
            await store.ingest_many(batch)
            written += len(batch)
            batch = []

    streams = [
        long_session(events, "chat_long", long_turns, end=True),
        long_session(events, "chat_stuck", long_turns // 2, end=False),
    ]
    for stream in streams:
        for record in stream:
            batch.append(record)
            if len(batch) >= BUILD_BATCH:
                await flush()
    number = 0
    while written + len(batch) < total:
        for record in lifecycle(events, f"chat_{number:07d}", TURNS_PER_SESSION, number):
            batch.append(record)
        number += 1
        if len(batch) >= BUILD_BATCH:
            await flush()
    await flush()
    return written


async def new_sessions_rate(store: Store, events: Events, sessions: int, tag: str) -> float:
    """Events per second for new sessions arriving 10 at a time, 16 requests in flight."""
    records = [r for n in range(sessions) for r in lifecycle(events, f"{tag}_{n}", 2, n)]
    chunks = [records[i : i + 10] for i in range(0, len(records), 10)]
    started = time.perf_counter()
    for i in range(0, len(chunks), 16):
        await asyncio.gather(*(store.ingest_many(c) for c in chunks[i : i + 16]))
    return len(records) / (time.perf_counter() - started)


async def timed(coro: Any) -> float:
    started = time.perf_counter()
    await coro
    return time.perf_counter() - started


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) > 1 else samples[0]


async def session_cost(store: Store, events: Events, session: str, turns: int) -> float:
    """Seconds per event for turns starting and ending in `session`, one event at a time."""
    records = [
        events.make(kind, session, f"extra_{t}")
        for t in range(turns)
        for kind in ("agent.chat.turn.started", "agent.chat.turn.completed")
    ]
    started = time.perf_counter()
    for record in records:
        await store.ingest(record)
    return (time.perf_counter() - started) / len(records)


async def first_stream_change(store: Store, session: str) -> float:
    """Seconds until a stream of `session` resumed from id 0 has its first page of
    changes, read the way a stream's replay reads it."""
    accepts = StreamFilter((), (), session)
    started = time.perf_counter()
    page = await store.list_session_changes(session, 0, 500, accepts.excluded)
    assert page, f"no changes of {session}"
    return time.perf_counter() - started


def store_bytes(work: Path) -> int:
    return sum(f.stat().st_size for f in work.glob("scale.db*"))


def wal_bytes(work: Path) -> int:
    """The WAL's share: at most about 8 MiB (the writer checkpoints there), whatever the size."""
    wal = work / "scale.db-wal"
    return wal.stat().st_size if wal.exists() else 0


def writer_rss_mib(store: SQLiteStore) -> float:
    process = getattr(store._batch_writer, "_process", None)
    if process is None:
        return float("nan")
    return rss_mib(process.pid)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run(total: int, long_turns: int, backend: Backend) -> list[tuple[str, str, str]]:
    await backend.create()
    try:
        return await measure(total, long_turns, backend)
    finally:
        await backend.drop()


async def measure(total: int, long_turns: int, backend: Backend) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    events = Events()
    store = backend.open()
    await store.open()
    await store.ingest(events.make("agent.chat.session.created", "warm_up"))  # starts the writer
    started = time.perf_counter()
    written = await build(store, events, total, long_turns)
    build_s = time.perf_counter() - started
    print(f"built {written:,} events in {build_s:.0f} s ({written / build_s:,.0f}/s)")
    # The full store against an empty one beside it, in alternating rounds, so that both
    # see the same machine: a ratio of medians holds where an absolute rate does not.
    empty = backend.open(empty=True)
    await empty.open()
    await empty.ingest(events.make("agent.chat.session.created", "warm_up_empty"))
    empty_rates: list[float] = []
    full_rates: list[float] = []
    for n in range(5):
        empty_rates.append(await new_sessions_rate(empty, events, 1000, f"empty{n}"))
        full_rates.append(await new_sessions_rate(store, events, 1000, f"full{n}"))
    await empty.close()
    ratio = statistics.median(full_rates) / statistics.median(empty_rates)
    print(
        f"new sessions, events/s per round: empty {', '.join(f'{r:,.0f}' for r in empty_rates)};"
        f" full {', '.join(f'{r:,.0f}' for r in full_rates)}"
    )
    rows.append(("ingest at full size / empty", f"{ratio:.2f}", ">= 0.9"))
    await store.close()

    store = backend.open()  # a restart: the long session's record is not cached
    await store.open()
    await store.ingest(events.make("agent.chat.session.created", "warm_up_again"))
    others: list[float] = []

    async def everyone_else() -> None:
        for n in range(200):
            others.append(
                await timed(store.ingest(events.make("agent.chat.session.created", f"other_{n}")))
            )

    background = asyncio.create_task(everyone_else())
    first = await timed(
        store.ingest(events.make("agent.chat.turn.started", "chat_long", "turn_new"))
    )
    await background
    rows.append((f"first event to an evicted {long_turns:,}-turn session", _ms(first), "<= 50 ms"))
    rows.append(("everyone else's ingest p99 meanwhile", _ms(p99(others)), "<= 100 ms"))

    fresh = await session_cost(store, events, "chat_fresh", 50)
    stuck = await session_cost(store, events, "chat_stuck", 50)
    rows.append(
        (f"per event, {long_turns // 2:,} running turns / fresh", f"{stuck / fresh:.2f}", "<= 2")
    )

    as_of = await store.last_seq()
    pages = [await timed(store.list_sessions(SessionQuery(as_of, None, 50))) for _ in range(50)]
    rows.append(("/v1/sessions?limit=50 p99 (store)", _ms(p99(pages)), "<= 20 ms"))
    rare = [await timed(store.list_changes(0, 100, ("turn.conflict",))) for _ in range(20)]
    rows.append(("/v1/changes?type=<never occurs> p99 (store)", _ms(p99(rare)), "<= 50 ms"))
    rows.append(
        (
            "session stream resumed from id 0: first change",
            _ms(await first_stream_change(store, "other_199")),
            "<= 100 ms",
        )
    )
    size, count = await backend.size(), await store.last_seq()
    rows.append(("bytes of store per event", f"{size / count:,.0f}", "<= 1,000"))
    rows.append(("  of which the WAL's (bounded, not per event)", backend.wal_share(count), ""))
    await store.ingest(events.make("agent.chat.turn.started", "chat_stuck", "turn_last"))
    rows.append(
        (
            "writer memory, long sessions cached",
            f"{backend.writer_rss_mib(store):.0f} MiB",
            "<= 200 MiB",
        )
    )
    await store.close()
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="size of the store")
    parser.add_argument("--long-turns", type=int, default=10_000, help="turns of the long session")
    parser.add_argument("--smoke", action="store_true", help="a small run (20,000 events)")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a database to create and drop the run's databases from (--store postgresql)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.events, args.long_turns = 20_000, 400
    with tempfile.TemporaryDirectory(prefix="relay-bench-scale-") as work:
        backend: Backend = (
            SQLiteBackend(Path(work)) if args.store == "sqlite" else PostgresBackend(args.pg_url)
        )
        rows = asyncio.run(run(args.events, args.long_turns, backend))
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'':{width}}  {'measured':>12}  target")
    for name, value, target in rows:
        print(f"{name:{width}}  {value:>12}  {target}")


if __name__ == "__main__":
    main()
