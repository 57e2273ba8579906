"""Hands commits from every relay instance to the local hub in change id order.

Theory of operation. Commits reach an instance out of order: its own at once, the
others' through Redis, each sender's in order but interleaved arbitrarily, and some not
at all (Redis down, a message dropped). The change log itself is the truth, and its ids
become visible in id order: a change with a higher id always commits after every lower
one. So the sequencer keeps the last change id it delivered and, for each commit,

- drops the changes at or below it (delivered already, from the log or another message);
- reads the missing ids from the log first when the commit starts past `last + 1` (they
  are committed, since a higher id is), then delivers the commit;
- on `catch_up`, delivers whatever the log holds after it (after a reconnect, and
  periodically as a safety net).

Each change is delivered once, in id order, with no gap.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.changes import Commit, StoredChange
from relay.hub import ReadChanges

PAGE = 500


def sessions_of(changes: list[StoredChange]) -> dict[str, int]:
    """The sessions `changes` touch, to wake their watches (the version is not known)."""
    return {change.session_id: 0 for change in changes if change.session_id}


class Sequencer:
    def __init__(self, deliver: Callable[[Commit], None], read_changes: ReadChanges) -> None:
        self._deliver = deliver
        self._read = read_changes
        self.last = 0  # the newest change id delivered
        self.filled = 0  # changes read from the log instead of arriving in a commit

    async def offer(self, commit: Commit) -> None:
        """Deliver what of `commit` is new, after any change missing before it."""
        changes = [change for change in commit.changes if change.id > self.last]
        if changes and changes[0].id > self.last + 1:
            await self._read_through(changes[0].id - 1)
            changes = [change for change in changes if change.id > self.last]
        if changes:
            self.last = changes[-1].id
        if changes or commit.sessions:
            self._deliver(Commit(changes, commit.sessions))

    async def catch_up(self, through: int | None = None) -> None:
        """Deliver the logged changes after the last one delivered (up to `through`)."""
        await self._read_through(through)

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
