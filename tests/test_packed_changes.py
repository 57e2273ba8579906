"""The change log stores state changes packed and serves them byte for byte as before."""

from __future__ import annotations

import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.changes import RAW_PREFIX, StoredChange
from relay.config import StoreSettings
from relay.packed_bodies import _DICTIONARIES as DICTIONARIES
from relay.packed_bodies import CHANGE, EVENT, FACTS, pack, unpack
from relay.state import SessionRecord, apply
from relay.store import Store, open_store
from relay.timefmt import format_unix
from tests.test_store_contract import Backend, backend, lifecycle, rec, store

__all__ = ["backend", "store"]  # fixtures: each test runs on SQLite and on PostgreSQL

TURNS = 50


def old_encoding(change_id: int, change: dict[str, Any]) -> bytes:
    """A change's body as the log stored it whole, before bodies were packed."""
    return orjson.dumps({"id": change_id, **change})


def expected_bodies(raws: list[bytes]) -> tuple[list[dict[str, Any]], SessionRecord]:
    """The state changes of the events, in order, as dicts; and the session's record."""
    record = None
    changes = []
    for raw in raws:
        record, caused = apply(record, rec(raw).event)
        changes += [change.to_dict() for change in caused]
    assert record is not None
    return changes, record


async def served(store: Store) -> list[StoredChange]:
    return [c for c in await store.list_changes(0, 10_000, exclude=()) if c.type[:4] != "raw."]


async def test_served_bodies_are_the_ones_stored_whole_before(store: Store) -> None:
    """A lifecycle's changes, alerts included, are served as the old encoding wrote them."""
    raws = lifecycle("chat_a", 6)
    await store.ingest_many([rec(raw) for raw in raws])
    now = time.time() + 3_600
    assert await store.fire_due_alerts(now) >= 1
    changes, record = expected_bodies(raws)
    state = await served(store)
    alerts = state[len(changes) :]
    for change, want in zip(state, changes, strict=False):
        assert change.body == old_encoding(change.id, want)
    for alert in alerts:
        turn = record.turns.get(alert.turn_id or "")
        want = {
            "type": alert.type,
            "occurred_at": format_unix(now),
            "session_id": "chat_a",
            "turn_id": alert.turn_id,
            "session": record.session.to_dict(),
            "turn": None if turn is None else turn.to_dict(),
            "cause": None,
        }
        assert alert.body == old_encoding(alert.id, want)
    by_session = await store.list_session_changes("chat_a", 0, 10_000)
    assert [c.body for c in by_session if not c.type.startswith(RAW_PREFIX)] == [
        c.body for c in state
    ]


async def test_stored_change_rows_stay_small(backend: Backend, store: Store) -> None:
    """Each stored state change of a 50-turn session takes at most 300 bytes of body."""
    await store.ingest_many([rec(raw) for raw in lifecycle("chat_long", TURNS)])
    rows = await backend.sql("SELECT type, body FROM changes ORDER BY id")
    state = [bytes(body) for kind, body in rows if not kind.startswith(RAW_PREFIX)]
    assert len(state) >= TURNS * 2
    assert all(body[:1] == CHANGE for body in state)
    assert max(map(len, state)) <= 300
    whole = sum(len(c.body) for c in await served(store))
    assert sum(map(len, state)) * 5 <= whole


async def test_bodies_stored_whole_are_still_served(backend: Backend, store: Store) -> None:
    """A change row written before bodies were packed is served as it is stored."""
    await store.ingest_many([rec(raw) for raw in lifecycle("chat_b", 1)])
    last = await store.last_change_id()
    whole = old_encoding(last + 1, {"type": "session.ready", "session_id": "chat_b"})
    await backend.sql(
        "INSERT INTO changes (id, type, session_id, turn_id, event_seq, body)"
        " VALUES ($1, 'session.ready', 'chat_b', NULL, NULL, $2)",
        last + 1,
        whole,
    )
    (change,) = await store.list_changes(last, 10)
    assert change.body == whole


# JSON values to pack: nested lists of nulls, strings and 64-bit integers.
JSON_VALUES = st.recursive(
    st.none() | st.text() | st.integers(-(2**63), 2**63 - 1), st.lists, max_leaves=30
)


@settings(max_examples=200, deadline=None)
@given(
    value=JSON_VALUES,
    repeat=st.sampled_from([1, 2_000]),
)
def test_packing_round_trips(value: Any, repeat: int) -> None:
    """Any JSON packed as a change or as facts, short or long, unpacks to the same bytes."""
    data = orjson.dumps({"v": [value] * repeat})
    for kind in (CHANGE, FACTS):
        assert unpack(pack(data, kind)) == data
    assert unpack(data) == data


@settings(max_examples=200, deadline=None)
@given(
    value=JSON_VALUES,
    repeat=st.sampled_from([1, 50]),
)
def test_packing_gives_the_bytes_a_new_compressor_gives(value: Any, repeat: int) -> None:
    """A value is packed to the bytes a compressor set up afresh with its dictionary gives:
    the stored format does not depend on reusing a primed compressor."""
    data = orjson.dumps({"v": [value] * repeat})
    for kind in (CHANGE, FACTS, EVENT):
        fresh = zlib.compressobj(
            6, zlib.DEFLATED, -12, 4, zlib.Z_DEFAULT_STRATEGY, DICTIONARIES[kind]
        )
        assert pack(data, kind) == kind + fresh.compress(data) + fresh.flush()


async def test_sqlite_snapshots_are_stored_packed_and_served_whole(tmp_path: Path) -> None:
    """SQLite keeps session and turn snapshots packed and serves the JSON a rebuild gives."""
    url = f"sqlite:///{tmp_path}/relay.db"
    opened = open_store(StoreSettings(url=url), {"src": "casedev"})
    await opened.open()
    try:
        raws = lifecycle("chat_s", 3)
        await opened.ingest_many([rec(raw) for raw in raws])
        _, record = expected_bodies(raws)
        row = await opened.get_session("chat_s")
        assert row is not None
        assert row.snapshot == orjson.dumps(record.session.to_dict())
        turns = [snapshot for _, snapshot in await opened.list_turns("chat_s", 0, 10)]
        assert sorted(turns) == sorted(orjson.dumps(t.to_dict()) for t in record.turns.values())
        with sqlite3.connect(tmp_path / "relay.db") as conn:
            stored = [s for (s,) in conn.execute("SELECT snapshot FROM turns")]
            assert all(s[:1] == CHANGE for s in stored)
            conn.execute("UPDATE sessions SET snapshot = ? WHERE session_id = 'chat_s'", (b"{}",))
        row = await opened.get_session("chat_s")
        assert row is not None
        assert row.snapshot == b"{}"  # written before snapshots were packed: served as is
    finally:
        await opened.close()
