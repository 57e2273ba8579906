"""The writer's cache of session entries is bounded in bytes, not in sessions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson

from relay.config import StoreSettings
from relay.normalize import decoder
from relay.packed_bodies import unpack
from relay.store import open_store
from relay.store.derive import SessionEntry, Thresholds, entry_of
from relay.store.entry_cache import SESSION_BYTES, TURN_BYTES, EntryCache, entry_bytes
from relay.store.sqlite_writer import BatchWriter
from tests.test_state_cost import session_of
from tests.test_store_contract import lifecycle, rec

THRESHOLDS = Thresholds(600.0, 120.0)


def entry(turns: int) -> SessionEntry:
    return entry_of(session_of(running=1, completed=turns - 1), 1, (), THRESHOLDS)


def test_an_entry_is_sized_by_its_turns() -> None:
    """An entry's estimated size grows with its turns by a constant per turn."""
    assert entry_bytes(entry(10)) == SESSION_BYTES + 10 * TURN_BYTES
    assert entry_bytes(entry(1_000)) == SESSION_BYTES + 1_000 * TURN_BYTES


def test_the_least_recently_used_leave_past_the_budget() -> None:
    """Entries past the byte budget leave oldest first; one used again stays."""
    size = entry_bytes(entry(20))
    cache = EntryCache(budget=3 * size)
    for name in ("a", "b", "c"):
        cache.put(name, entry(20))
    assert cache.get("a") is not None  # "b" is now the least recently used
    cache.put("d", entry(20))
    assert "b" not in cache
    assert all(name in cache for name in ("a", "c", "d"))
    assert cache.bytes == 3 * size
    cache.put("big", entry(200))  # larger than the budget: it alone stays
    assert len(cache) == 1
    assert "big" in cache
    assert cache.bytes == entry_bytes(entry(200))


async def test_a_writer_keeps_its_cache_within_its_budget(tmp_path: Path) -> None:
    """A writer evicts a long session by bytes and reads it back from its stored facts."""
    path = tmp_path / "relay.db"
    store = open_store(StoreSettings(url=f"sqlite:///{path}"), {"src": "casedev"})
    await store.open()
    await store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    budget = 30 * TURN_BYTES + 4 * SESSION_BYTES
    writer = BatchWriter(conn, decoder({"src": "casedev"}), 600.0, 120.0, cache_bytes=budget)
    writer.write([rec(raw) for raw in lifecycle("chat_long", 40)])
    assert "chat_long" in writer.cache  # the entry used last stays, larger or not
    for n in range(6):
        writer.write([rec(raw) for raw in lifecycle(f"chat_{n}", 2)])
        assert writer.cache.bytes <= budget
    assert "chat_long" not in writer.cache
    assert "chat_5" in writer.cache
    more = lifecycle("chat_long", 41)[-2:]  # its 41st turn
    writer.write([rec(raw) for raw in more])
    (snapshot,) = conn.execute(
        "SELECT snapshot FROM sessions WHERE session_id = 'chat_long'"
    ).fetchone()
    assert orjson.loads(unpack(snapshot))["counts"]["turns"] == 41
    conn.close()
