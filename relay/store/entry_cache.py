"""A writer's cache of session entries, bounded by the memory they hold.

A session's entry holds its facts and a snapshot per turn, so its size grows with its
turns: a cache bounded in sessions holds a few bytes or gigabytes depending on which
sessions are in it. This one estimates each entry's size from its turn count (read in
constant time: the record keeps its turns in a persistent map) and evicts the least
recently used entries once their sum passes the budget. Eviction is cheap: a miss
reads the session's stored facts, it never replays its events.
"""

from __future__ import annotations

from collections import OrderedDict

from relay.store.derive import SessionEntry

# Measured: a session's record holds about 750 bytes per turn (its facts, its snapshot
# and their share of the maps), and a few KiB of its own.
SESSION_BYTES = 4096
TURN_BYTES = 800


def entry_bytes(entry: SessionEntry) -> int:
    """The memory an entry is taken to hold."""
    record = entry.record
    if record is None:
        return SESSION_BYTES
    # An entry read from the store holds its running turns' places, not their facts:
    # counted as turns, which overstates them.
    held = max(len(record.facts.turns), len(record.summary.running))
    return SESSION_BYTES + TURN_BYTES * held


class EntryCache:
    """Session entries by session id, least recently used first, within `budget` bytes
    (the entry used last is kept even when it alone is larger)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[SessionEntry, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries

    def get(self, session_id: str) -> SessionEntry | None:
        """The entry, now the most recently used; None if it is not cached."""
        found = self._entries.get(session_id)
        if found is None:
            return None
        self._entries.move_to_end(session_id)
        return found[0]

    def put(self, session_id: str, entry: SessionEntry) -> None:
        """Cache `entry` as the most recently used; evict the oldest past the budget."""
        size = entry_bytes(entry)
        old = self._entries.pop(session_id, None)
        if old is not None:
            self.bytes -= old[1]
        self._entries[session_id] = (entry, size)
        self.bytes += size
        while self.bytes > self.budget and len(self._entries) > 1:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted

    def pop(self, session_id: str) -> None:
        found = self._entries.pop(session_id, None)
        if found is not None:
            self.bytes -= found[1]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
