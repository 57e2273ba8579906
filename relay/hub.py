"""The fan-out hub: where committed changes go to reach subscribers.

In embedded mode it lives in the process; the Redis hub (`relay.hub_redis`) carries the
same interface across relay instances. The ingest path only publishes; SSE streams,
long-poll readers and the webhook dispatcher consume. `open_hub` picks the hub by URL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from relay.changes import Commit, StoredChange
from relay.config import HubSettings

# Reads the change log: changes with `id > after`, oldest first, at most `limit`.
ReadChanges = Callable[[int, int], Awaitable[list[StoredChange]]]
LastChangeId = Callable[[], Awaitable[int]]


class SessionWatch(Protocol):
    async def wait(self, seconds: float) -> bool:
        """Wait until the session changes (True) or `seconds` pass (False)."""


class Subscription(Protocol):
    overflowed: bool
    closed: bool

    def deliver_to(self, sink: Callable[[StoredChange], None]) -> list[StoredChange]:
        """From now on hand each accepted change to `sink` as it is published, instead of
        buffering it; returns what was buffered until now."""

    async def ended(self, seconds: float) -> bool:
        """Wait up to `seconds` for the subscription to close or overflow."""

    def overflow(self) -> None:
        """Give up on this subscriber (its sink could not keep up)."""

    def close(self) -> None:
        """End this subscription cleanly (shutdown, or its API key was revoked)."""


class Hub(Protocol):
    async def start(self) -> None:
        """Begin carrying changes (after the store has opened)."""

    async def stop(self) -> None:
        """Stop carrying changes and let go of connections (before the store closes)."""

    def publish(self, commit: Commit) -> None:
        """Hand a commit to every instance; never blocks and never raises."""

    def add_commit_listener(self, listener: Callable[[Commit], None]) -> None:
        """Call `listener` with each commit as it reaches this instance, in id order."""

    def subscribe(
        self,
        accepts: Callable[[StoredChange], bool],
        limit: int,
        on_overflow: Callable[[], None],
    ) -> AbstractContextManager[Subscription]:
        """Receive every published change `accepts`, buffering at most `limit`.

        When the buffer is full the subscription is marked `overflowed`, gets nothing
        more, and `on_overflow` is called (to close the subscriber's connection).
        """

    def close(self) -> None:
        """Mark every subscription closed (shutdown)."""

    @property
    def subscribers(self) -> int:
        """How many subscriptions are open (on this instance)."""

    def watch_session(self, session_id: str) -> AbstractContextManager[SessionWatch]:
        """A watch to open *before* reading the session, so no change falls between."""

    @property
    def watching(self) -> int:
        """How many session watches are open (on this instance)."""

    def counters(self) -> Mapping[str, int]:
        """Counts for metrics (commits published, dropped, received...); none in process."""


class _Watch:
    def __init__(self) -> None:
        self.changed = asyncio.Event()

    async def wait(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.changed.wait(), seconds)
        except TimeoutError:
            return False
        self.changed.clear()
        return True


class _Subscription:
    def __init__(
        self,
        accepts: Callable[[StoredChange], bool],
        limit: int,
        on_overflow: Callable[[], None],
    ) -> None:
        self._accepts = accepts
        self._limit = limit
        self._on_overflow = on_overflow
        self._queue: deque[StoredChange] = deque()
        self._ready = asyncio.Event()
        self._sink: Callable[[StoredChange], None] | None = None
        self.overflowed = False
        self.closed = False

    def offer(self, change: StoredChange) -> None:
        if self.overflowed or self.closed or not self._accepts(change):
            return
        if self._sink is not None:
            self._sink(change)
            return
        if len(self._queue) >= self._limit:
            self.overflow()
            return
        self._queue.append(change)
        self._ready.set()

    def overflow(self) -> None:
        if self.overflowed:
            return
        self.overflowed = True
        self._queue.clear()
        self._ready.set()
        self._on_overflow()

    def deliver_to(self, sink: Callable[[StoredChange], None]) -> list[StoredChange]:
        self._sink = sink
        buffered = list(self._queue)
        self._queue.clear()
        return buffered

    async def ended(self, seconds: float) -> bool:
        if not (self.closed or self.overflowed):
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), seconds)
        return self.closed or self.overflowed

    def close(self) -> None:
        self.closed = True
        self._ready.set()


class InProcessHub:
    def __init__(self) -> None:
        self._watches: defaultdict[str, set[_Watch]] = defaultdict(set)
        self._subscriptions: set[_Subscription] = set()
        self._listeners: list[Callable[[Commit], None]] = []
        self._closed = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def counters(self) -> Mapping[str, int]:
        return {}

    def add_commit_listener(self, listener: Callable[[Commit], None]) -> None:
        self._listeners.append(listener)

    def publish(self, commit: Commit) -> None:
        for session_id in commit.sessions:
            for watch in self._watches.get(session_id, ()):
                watch.changed.set()
        if commit.changes:
            for subscription in list(self._subscriptions):
                for change in commit.changes:
                    subscription.offer(change)
        for listener in self._listeners:
            listener(commit)

    @contextmanager
    def subscribe(
        self,
        accepts: Callable[[StoredChange], bool],
        limit: int,
        on_overflow: Callable[[], None],
    ) -> Iterator[_Subscription]:
        subscription = _Subscription(accepts, limit, on_overflow)
        if self._closed:  # shutting down: a stream that starts now ends at once
            subscription.close()
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    def close(self) -> None:
        self._closed = True
        for subscription in self._subscriptions:
            subscription.close()

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    @contextmanager
    def watch_session(self, session_id: str) -> Iterator[_Watch]:
        watch = _Watch()
        self._watches[session_id].add(watch)
        try:
            yield watch
        finally:
            watches = self._watches[session_id]
            watches.discard(watch)
            if not watches:
                del self._watches[session_id]

    @property
    def watching(self) -> int:
        return sum(len(watches) for watches in self._watches.values())


def open_hub(settings: HubSettings, read_changes: ReadChanges, last_change_id: LastChangeId) -> Hub:
    """The hub `settings.url` names; the Redis client is imported only when used."""
    if settings.url.startswith("memory://"):
        return InProcessHub()
    from relay.hub_redis import RedisHub

    return RedisHub(settings, read_changes, last_change_id)
