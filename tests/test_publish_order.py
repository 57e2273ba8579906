"""Commits are handed to the listeners in change id order when batches are written two
at a time and their answers resume out of the order in which they took their ids."""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest

from relay.changes import Commit, StoredChange
from relay.config import AlertSettings, StoreSettings
from relay.store import IngestRecord, IngestResult
from relay.store.base import GroupCommit
from relay.store.postgres import PostgresStore
from tests.test_store_contract import lifecycle, rec


def _changes(first: int, count: int) -> list[StoredChange]:
    return [
        StoredChange(i, "turn.started", "chat_a", None, b"{}") for i in range(first, first + count)
    ]


class _TwoWriters:
    """Batches that take ids in arrival order and are answered in the reverse order."""

    def __init__(self) -> None:
        self.commits: GroupCommit | None = None
        self.next_id = 1
        self.first_taken = asyncio.Event()
        self.second_answered = asyncio.Event()
        self.fail_first = False
        self.all_published = asyncio.Event()

    async def write(self, batch: list[IngestRecord]) -> tuple[list[IngestResult], Commit]:
        assert self.commits is not None
        first, self.next_id = self.next_id, self.next_id + 2
        self.commits.hold(first)
        if first == 1:  # the first batch's answer resumes after the second's
            self.first_taken.set()
            await self.second_answered.wait()
            if self.fail_first:
                self.commits.release(first)
                raise ConnectionResetError("lost")
        else:
            await self.first_taken.wait()
        results = [IngestResult(first + n, False) for n in range(len(batch))]
        return results, Commit(_changes(first, 2), {})


async def _read_nothing(after: int, limit: int) -> list[StoredChange]:
    return []


def _writers(published: list[int], expected: int) -> tuple[_TwoWriters, GroupCommit]:
    writers = _TwoWriters()

    def unavailable(exc: Exception) -> None:
        return None

    def listen(commit: Commit) -> None:
        published.extend(c.id for c in commit.changes)
        if len(published) >= expected:
            writers.all_published.set()

    commits = GroupCommit(writers.write, _read_nothing, unavailable, 1, 2, fill_gaps=False)
    commits.listeners.append(listen)
    writers.commits = commits
    return writers, commits


async def test_a_commit_of_later_ids_waits_for_the_earlier_one_to_be_published() -> None:
    """The second batch's answer comes first, yet its changes are published after the first's."""
    published: list[int] = []
    writers, commits = _writers(published, 4)
    commits.start(0)
    record = rec(lifecycle("chat_a", 1)[0])
    first = asyncio.create_task(commits.ingest(record))
    await writers.first_taken.wait()
    second = asyncio.create_task(commits.ingest(record))
    await asyncio.wait({second}, timeout=5)
    assert second.done()  # answered, its changes not handed over yet
    assert published == []
    writers.second_answered.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    await asyncio.wait_for(writers.all_published.wait(), 5)
    await commits.close()
    assert published == [1, 2, 3, 4]


async def test_a_released_hold_lets_later_commits_through() -> None:
    """A batch that held lower ids and failed does not stop later commits being published."""
    published: list[int] = []
    writers, commits = _writers(published, 2)
    writers.fail_first = True
    commits.start(0)
    record = rec(lifecycle("chat_a", 1)[0])
    first = asyncio.create_task(commits.ingest(record))
    await writers.first_taken.wait()
    second = asyncio.create_task(commits.ingest(record))
    await asyncio.wait({second}, timeout=5)
    writers.second_answered.set()
    results = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5)
    await asyncio.wait_for(writers.all_published.wait(), 5)
    await commits.close()
    assert isinstance(results[0], Exception)
    assert published == [3, 4]


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_postgres_publishes_every_change_once_in_id_order_with_two_batches_in_flight(
    pg_url: str, writer: Literal["process", "thread"]
) -> None:
    """Concurrent ingests on one instance writing two batches at once (pipelined to the
    writer process, or both on the loop) publish ids 1..n in order."""
    settings = StoreSettings(url=pg_url, batch_max=8, writer=writer)
    store = PostgresStore(settings, {}, AlertSettings(), in_flight=2)
    published: list[int] = []
    store.add_commit_listener(lambda commit: published.extend(c.id for c in commit.changes))
    await store.open()
    try:
        records = [rec(raw) for s in range(30) for raw in lifecycle(f"chat_{s % 10}_{s}", 3)]
        pending = iter(records)

        async def client() -> None:
            for record in pending:
                await store.ingest(record)

        await asyncio.gather(*(client() for _ in range(24)))
        stored = await store.last_change_id()
    finally:
        await store.close()
    assert stored > len(records) // 2
    assert published == list(range(1, stored + 1))
