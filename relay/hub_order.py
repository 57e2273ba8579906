"""Hands commits from every relay instance to the local hub in change id order.

Theory of operation. Commits reach an instance out of order: its own at once, the
others' through Redis, each sender's in order but interleaved arbitrarily, and some not
at all (Redis down, a message dropped). The change log itself is the truth, and its ids
become visible in id order: a change with a higher id always commits after every lower
one. So the sequencer keeps the last change id it delivered and, for each commit,

- drops the changes at or below it (delivered already, from the log or another message);
- delivers the commit when it starts at `last + 1`, then any held commit that now follows;
- holds a commit that starts past `last + 1` for a moment (`gap_wait`), as the missing
  ids are most often on their way from another instance; when they have not come by
  then, reads them from the log (they are committed, since a higher id is) and delivers
  the held commits after them;
- on `catch_up`, delivers whatever the log holds after it (after a reconnect, and
  periodically as a safety net).

Each change is delivered once, in id order, with no gap.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable

from relay.changes import Commit, StoredChange
from relay.hub import ReadChanges

PAGE = 500


def sessions_of(changes: list[StoredChange]) -> dict[str, int]:
    """The sessions `changes` touch, to wake their watches (the version is not known)."""
    return {change.session_id: 0 for change in changes if change.session_id}


class Sequencer:
    def __init__(
        self,
        deliver: Callable[[Commit], None],
        read_changes: ReadChanges,
        gap_wait: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._deliver = deliver
        self._read = read_changes
        self._gap_wait = gap_wait
        self._clock = clock
        self._held: list[tuple[int, int, Commit]] = []  # (first id, arrival, commit)
        self._arrivals = itertools.count()
        self._held_since = 0.0
        self.last = 0  # the newest change id delivered
        self.filled = 0  # changes read from the log instead of arriving in a commit

    def fill_due_in(self) -> float | None:
        """Seconds until held commits are due to be filled from the log (None: none held)."""
        if not self._held:
            return None
        return max(0.0, self._held_since + self._gap_wait - self._clock())

    async def offer(self, commit: Commit) -> None:
        """Deliver what of `commit` is new, in order; hold it while ids before it miss."""
        changes = [change for change in commit.changes if change.id > self.last]
        if changes and changes[0].id > self.last + 1:
            if self._gap_wait <= 0:
                await self._deliver_after_gap(Commit(changes, commit.sessions))
                return
            if not self._held:
                self._held_since = self._clock()
            heapq.heappush(self._held, (changes[0].id, next(self._arrivals), commit))
            return
        self._hand_over(commit, changes)
        self._release()

    async def fill(self) -> None:
        """Read the ids missing before the held commits from the log, then deliver them."""
        held, self._held = sorted(self._held), []
        for _, _, commit in held:
            await self._deliver_after_gap(commit)

    async def catch_up(self, through: int | None = None) -> None:
        """Deliver the logged changes after the last one delivered (up to `through`)."""
        await self._read_through(through)
        self._release()

    def _release(self) -> None:
        while self._held and self._held[0][0] <= self.last + 1:
            _, _, commit = heapq.heappop(self._held)
            self._hand_over(commit, [c for c in commit.changes if c.id > self.last])
        if self._held:
            self._held_since = self._clock()  # a new gap: wait for it afresh

    async def _deliver_after_gap(self, commit: Commit) -> None:
        first = next((c.id for c in commit.changes if c.id > self.last), None)
        if first is not None and first > self.last + 1:
            await self._read_through(first - 1)
        self._hand_over(commit, [c for c in commit.changes if c.id > self.last])

    def _hand_over(self, commit: Commit, changes: list[StoredChange]) -> None:
        if changes:
            self.last = changes[-1].id
        if changes or not commit.changes:  # a commit delivered already wakes nobody again
            self._deliver(Commit(changes, commit.sessions))

    async def _read_through(self, through: int | None) -> None:
        while through is None or self.last < through:
            limit = PAGE if through is None else min(PAGE, through - self.last)
            page = await self._read(self.last, limit)
            page = [c for c in page if c.id > self.last and (through is None or c.id <= through)]
            if page:
                self.last = page[-1].id
                self.filled += len(page)
                self._deliver(Commit(page, sessions_of(page)))
            if len(page) < limit:
                return
