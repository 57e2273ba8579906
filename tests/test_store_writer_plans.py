"""The SQLite writer's per-batch lookups are served from indexes, whatever the store's size."""

from __future__ import annotations

import sqlite3
from itertools import chain
from pathlib import Path

from relay.config import StoreSettings
from relay.store import open_store
from relay.store.sqlite import SQLiteStore
from relay.store.sqlite_writer import turn_rows_query


async def migrated(tmp_path: Path) -> Path:
    path = tmp_path / "plans.db"
    store = open_store(StoreSettings(url=f"sqlite:///{path}", writer="thread"))
    assert isinstance(store, SQLiteStore)
    await store.open()
    await store.close()
    return path


async def test_turn_lookup_searches_the_turns_key(tmp_path: Path) -> None:
    """Looking up many (session, turn) pairs searches the turns' key; no turn is scanned."""
    path = await migrated(tmp_path)
    pairs = [(f"c{n}", f"t{n}") for n in range(40)]
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "EXPLAIN QUERY PLAN " + turn_rows_query(len(pairs)), list(chain.from_iterable(pairs))
        ).fetchall()
    steps = [str(row[-1]) for row in rows]
    assert any(step.startswith("SEARCH t USING INDEX") for step in steps), steps
    assert not any(step.startswith(("SCAN t ", "SCAN turns")) or step == "SCAN t" for step in steps)


async def test_turn_lookup_finds_the_stored_turns(tmp_path: Path) -> None:
    """The lookup returns each stored pair's facts and nothing for pairs not stored."""
    path = await migrated(tmp_path)
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO turns (session_id, turn_id, status, version, snapshot, facts)"
            " VALUES (?, ?, 'running', 1, x'00', ?)",
            [("c1", "t1", b"a"), ("c1", "t2", b"b"), ("c2", "t1", b"c")],
        )
        pairs = [("c1", "t2"), ("c2", "t1"), ("c3", "t1")]
        found = conn.execute(turn_rows_query(3), list(chain.from_iterable(pairs))).fetchall()
    assert sorted(found) == [("c1", "t2", b"b"), ("c2", "t1", b"c")]
