"""What the hub tests share: an in-memory change log, hubs to test, and a subscriber."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from relay.changes import Commit, StoredChange
from relay.config import HubSettings
from relay.hub import Hub, InProcessHub
from relay.hub_redis import RedisHub


class ChangeLog:
    """The store's change log as the hub reads it: a list, appended in id order."""

    def __init__(self) -> None:
        self.changes: list[StoredChange] = []
        self.reads = 0

    def append(self, count: int, session_id: str = "s1") -> Commit:
        """Log `count` new changes; the commit a store would publish for them."""
        first = len(self.changes) + 1
        new = [change(n, session_id) for n in range(first, first + count)]
        self.changes.extend(new)
        return Commit(new, {session_id: first + count - 1})

    async def read_changes(self, after: int, limit: int) -> list[StoredChange]:
        self.reads += 1
        return [c for c in self.changes if c.id > after][:limit]

    async def last_change_id(self) -> int:
        return len(self.changes)


def change(change_id: int, session_id: str = "s1", kind: str = "turn.started") -> StoredChange:
    body = b'{"id":%d,"type":"%s","session_id":"%s"}' % (
        change_id,
        kind.encode(),
        session_id.encode(),
    )
    return StoredChange(change_id, kind, session_id, None, body)


def redis_hub(url: str, prefix: str, log: ChangeLog, **settings: Any) -> RedisHub:
    return RedisHub(
        HubSettings(url=url, prefix=prefix, **settings), log.read_changes, log.last_change_id
    )


@asynccontextmanager
async def running(hub: Hub) -> AsyncIterator[Hub]:
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


def in_process(log: ChangeLog) -> Hub:
    return InProcessHub()


class Received:
    """A subscriber's changes as the hub hands them over (no buffering)."""

    def __init__(self) -> None:
        self.changes: list[StoredChange] = []

    def __call__(self, change: StoredChange) -> None:
        self.changes.append(change)

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self.changes]


def everything(change: StoredChange) -> bool:
    return True


def nothing() -> None:
    return None


HubFactory = Callable[[ChangeLog], Hub]
