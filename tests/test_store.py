"""The store contract, run against every backend."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relay.config import AlertSettings, StoreSettings
from relay.events import Event
from relay.store import ApiKey, IngestRecord, Store, StoreUnavailable, open_store
from relay.store.writer_process import WriterProcess, sqlite_config
from tests.conftest import Load

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def record(event_id: str, source: str = "s") -> IngestRecord:
    event = Event(
        source=source, id=event_id, type="agent.worker.ready", occurred_at=NOW, session_id="c"
    )
    body = b'{"id": "%s", "type": "agent.worker.ready", "data": {"chatId": "c"}}'
    return IngestRecord(event, body % event_id.encode(), NOW)


@pytest.fixture(params=["sqlite-process", "sqlite-thread"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    writer = request.param.partition("-")[2]
    backend = open_store(StoreSettings(url=f"sqlite:///{tmp_path}/contract.db", writer=writer))
    await backend.open()
    yield backend
    await backend.close()


class TestStoreContract:
    async def test_ingest_assigns_increasing_seq(self, store: Store) -> None:
        """New events get increasing seqs and are listed in seq order."""
        results = [await store.ingest(record(f"e{i}")) for i in range(5)]
        assert [r.duplicate for r in results] == [False] * 5
        assert [r.seq for r in results] == sorted(r.seq for r in results)
        listed = await store.list_events(0, 100)
        assert [e.id for e in listed] == [f"e{i}" for i in range(5)]
        assert listed[0].payload.startswith(b'{"id": "e0"')
        assert listed[0].occurred_at == "2026-11-22T12:00:00.000Z"

    async def test_duplicates_keep_the_first_seq(self, store: Store) -> None:
        """A repeated (source, id) is a duplicate with the original seq, even in one batch."""
        first = await store.ingest(record("e1"))
        results = await asyncio.gather(*(store.ingest(record("e1")) for _ in range(20)))
        assert {r.seq for r in results} == {first.seq}
        assert all(r.duplicate for r in results)
        other_source = await store.ingest(record("e1", source="t"))
        assert not other_source.duplicate
        assert len(await store.list_events(0, 100)) == 2

    async def test_paging_by_seq(self, store: Store) -> None:
        """list_events(after, limit) pages through the log without gaps or repeats."""
        await asyncio.gather(*(store.ingest(record(f"e{i:02d}")) for i in range(25)))
        seen, after = [], 0
        while page := await store.list_events(after, 10):
            seen.extend(e.id for e in page)
            after = page[-1].seq
        assert sorted(seen) == [f"e{i:02d}" for i in range(25)]
        assert len(seen) == 25

    async def test_api_keys(self, store: Store) -> None:
        """Keys are found by hash, listed, and revoked once."""
        key = ApiKey("key_1", "k", ("agent:read",), "2026-11-22T12:00:00.000Z")
        await store.add_api_key(key, "hash1")
        assert await store.find_api_key("hash1") == key
        assert await store.find_api_key("other") is None
        assert await store.revoke_api_key("key_1", "2026-11-22T13:00:00.000Z")
        assert not await store.revoke_api_key("key_1", "2026-11-22T14:00:00.000Z")
        listed = await store.list_api_keys()
        assert listed[0].revoked_at == "2026-11-22T13:00:00.000Z"

    async def test_closed_store_refuses_writes(self, store: Store) -> None:
        """After close, ingest raises StoreUnavailable instead of hanging."""
        await store.ingest(record("e1"))
        await store.close()
        with pytest.raises(StoreUnavailable):
            await store.ingest(record("e2"))
        await store.open()
        assert [e.id for e in await store.list_events(0, 10)] == ["e1"]


async def test_batch_with_stored_repeated_and_new_events(tmp_path: Path) -> None:
    """One batch mixing new, already-stored and repeated events gets consistent seqs."""
    store = open_store(StoreSettings(url=f"sqlite:///{tmp_path}/mixed.db"))
    await store.open()
    try:
        first = await store.ingest(record("old"))
        ids = ["new1", "old", "new1", "new2", "old"]
        results = await asyncio.gather(*(store.ingest(record(i)) for i in ids))
        seqs = {i: r.seq for i, r in zip(ids, results, strict=True)}
        assert seqs["old"] == first.seq
        assert [r.duplicate for r in results] == [False, True, True, False, True]
        assert len({seqs["new1"], seqs["new2"], seqs["old"]}) == 3
        listed = await store.list_events(0, 100)
        assert [(e.id, e.seq) for e in listed] == sorted(
            [("old", seqs["old"]), ("new1", seqs["new1"]), ("new2", seqs["new2"])],
            key=lambda pair: pair[1],
        )
    finally:
        await store.close()


async def test_rows_written_by_another_connection_are_respected(tmp_path: Path) -> None:
    """When another writer adds events meanwhile, new seqs continue after its rows."""
    import sqlite3

    store = open_store(StoreSettings(url=f"sqlite:///{tmp_path}/shared.db"))
    await store.open()
    try:
        await store.ingest(record("a"))
        other = sqlite3.connect(tmp_path / "shared.db", isolation_level=None)
        other.execute(
            "INSERT INTO events (seq, source, event_id, type, occurred_at, received_at, payload)"
            " VALUES (2, 's', 'b', 't', '2026-11-22T12:00:00.000Z', '2026-11-22T12:00:00.000Z',"
            " x'7b7d')"
        )
        other.close()
        result = await store.ingest(record("c"))
        again = await store.ingest(record("b"))
        assert (result.seq, result.duplicate) == (3, False)
        assert (again.seq, again.duplicate) == (2, True)
        assert [e.id for e in await store.list_events(0, 10)] == ["a", "b", "c"]
    finally:
        await store.close()


async def test_a_writer_process_that_dies_is_replaced(tmp_path: Path) -> None:
    """After the writer process is killed, the next ingests succeed in a new one, which
    ends with the store."""
    await writer_process_replaced(f"sqlite:///{tmp_path}/replaced.db")


async def test_a_postgres_writer_process_that_dies_is_replaced(pg_url: str) -> None:
    await writer_process_replaced(pg_url)


async def writer_process_replaced(url: str) -> None:
    import os
    import signal

    from tests.test_crash import child_pids, ended

    others = set(child_pids(os.getpid()))  # (processes another test left are not ours)
    store = open_store(StoreSettings(url=url))
    await store.open()
    try:
        first = await store.ingest(record("before"))
        (writer,) = set(child_pids(os.getpid())) - others
        os.kill(writer, signal.SIGKILL)
        assert await ended([writer], 30)
        for _ in range(3000):  # until the event loop has seen the exit (at most ~30 s)
            await asyncio.sleep(0.01)
            try:
                after = await store.ingest(record("after"))
                break
            except StoreUnavailable:
                continue
        assert (after.seq, after.duplicate) == (first.seq + 1, False)
        assert [e.id for e in await store.list_events(0, 10)] == ["before", "after"]
        replaced = sorted(set(child_pids(os.getpid())) - others)
        assert replaced not in ([], [writer])
    finally:
        await store.close()
    assert await ended(replaced, 30)


@pytest.mark.slow
async def test_the_wal_stays_bounded_under_sustained_ingest(tmp_path: Path, load: Load) -> None:
    """Under writes that never pause, the write-ahead log is still checkpointed back to
    the start: it stays within a few MB while far more than that is written."""
    store = open_store(StoreSettings(url=f"sqlite:///{tmp_path}/busy.db", writer="process"))
    await store.open()
    filler = "x" * 2048
    written = 0
    try:
        for start in range(0, load.wal_events, 64):
            records = []
            for n in range(start, start + 64):
                event = Event("s", f"e{n}", "agent.worker.ready", NOW, f"c{n % 500}")
                body = b'{"id": "e%d", "type": "agent.worker.ready", "data": {"chatId": "c%d",' % (
                    n,
                    n % 500,
                )
                body += b' "filler": "%s"}}' % filler.encode()
                written += len(body)
                records.append(IngestRecord(event, body, NOW))
            await asyncio.gather(*(store.ingest(r) for r in records))
        wal = (tmp_path / "busy.db-wal").stat().st_size
    finally:
        await store.close()
    assert written > 16_000_000
    assert wal < 16_000_000, f"the WAL grew to {wal} bytes"


async def test_a_writer_start_cancelled_midway_leaves_no_socket_open(tmp_path: Path) -> None:
    """A call cancelled while it starts the writer process leaves neither end of the
    socket pair open (an unclosed socket would fail the test as a ResourceWarning), and
    the next call starts the writer afresh."""
    writer = WriterProcess(
        sqlite_config(tmp_path / "relay.db", StoreSettings(), AlertSettings(), {})
    )
    try:
        for turns in range(1, 6):  # cancelled at successive points of the start
            call = asyncio.create_task(writer.probe())
            for _ in range(turns):
                await asyncio.sleep(0)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await writer.close()
            gc.collect()
        await writer.probe()
        assert writer.pid is not None
    finally:
        await writer.close()
