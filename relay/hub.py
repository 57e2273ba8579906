"""The fan-out hub: where committed changes go to reach subscribers.

In embedded mode it lives in the process; a Redis implementation will carry the same
interface across relay instances. The ingest path only publishes; long-poll readers
(and, later, SSE streams and the webhook dispatcher) consume.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

from relay.changes import Commit


class SessionWatch(Protocol):
    async def wait(self, seconds: float) -> bool:
        """Wait until the session changes (True) or `seconds` pass (False)."""


class Hub(Protocol):
    def publish(self, commit: Commit) -> None: ...

    def watch_session(self, session_id: str) -> AbstractContextManager[SessionWatch]:
        """A watch to open *before* reading the session, so no change falls between."""


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


class InProcessHub:
    def __init__(self) -> None:
        self._watches: defaultdict[str, set[_Watch]] = defaultdict(set)

    def publish(self, commit: Commit) -> None:
        for session_id in commit.sessions:
            for watch in self._watches.get(session_id, ()):
                watch.changed.set()

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
