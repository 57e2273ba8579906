"""Sessions' entries read back from PostgreSQL for a batch, as the SQLite writer reads
them: a session's facts row, its last turn, the places of its running turns and its
alert rows; a turn of the batch's events that an entry does not hold is read then."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import asyncpg

from relay.state import RunKey, affects_state
from relay.store import IngestRecord
from relay.store.derive import NO_SESSION, SessionEntry, Thresholds, stored_entry
from relay.store.facts import decode_turns, last_turn_of, run_key

TurnRows = dict[str, list[tuple[str, bytes]]]


async def load_entries(
    conn: asyncpg.Connection, rows: Sequence[Any], thresholds: Thresholds
) -> tuple[dict[str, SessionEntry], int]:
    """The entries of the facts rows given (session id, version, facts, fired), and how
    many turn rows were decoded for them."""
    every: list[str] = []  # facts stored before they summed their turns
    last: dict[str, str | None] = {}
    for session_id, _, facts, _ in rows:
        if facts is not None:
            needs_all, last_turn = last_turn_of(facts)
            if needs_all:
                every.append(session_id)
            else:
                last[session_id] = last_turn
    turns = await _select(
        conn,
        "SELECT session_id, turn_id, facts FROM turns WHERE session_id = ANY($1::text[])"
        " ORDER BY session_id, position",
        every,
    )
    pairs = [(sid, turn_id) for sid, turn_id in last.items() if turn_id is not None]
    turns.update(await turn_rows(conn, pairs))
    running: dict[str, dict[str, RunKey]] = {sid: {} for sid in last}
    found = await _select(
        conn,
        "SELECT session_id, turn_id, facts FROM turns WHERE session_id = ANY($1::text[])"
        " AND status = 'running' ORDER BY session_id, position",
        list(last),
    )
    for sid, held in found.items():
        running[sid] = {turn_id: run_key(turn_id, facts) for turn_id, facts in held}
    alerts: dict[str, list[tuple[str, str]]] = {}
    if last:
        for sid, turn_id, kind in await conn.fetch(
            "SELECT session_id, turn_id, kind FROM alerts WHERE session_id = ANY($1::text[])",
            list(last),
        ):
            alerts.setdefault(sid, []).append((kind, turn_id))
    entries: dict[str, SessionEntry] = {}
    for session_id, version, facts, fired in rows:
        if facts is None:
            entries[session_id] = replace(NO_SESSION, stamp=version)
        else:
            entries[session_id] = stored_entry(
                session_id,
                version,
                facts,
                fired,
                turns.get(session_id, []),
                thresholds,
                running=running.get(session_id) if session_id in last else None,
                alerts=alerts.get(session_id, ()),
            )
    return entries, sum(len(found) for found in turns.values())


async def hold_turns(
    conn: asyncpg.Connection, batch: list[IngestRecord], entries: dict[str, SessionEntry]
) -> int:
    """Read into `entries` the stored turns of the batch's events that they do not hold
    (entries read with only some turns); how many turn rows were read."""
    wanted: dict[str, set[str]] = {}
    for r in batch:
        sid, turn_id = r.event.session_id, r.event.turn_id
        if sid is not None and turn_id is not None and affects_state(r.event):
            wanted.setdefault(sid, set()).add(turn_id)
    pairs: list[tuple[str, str]] = []
    for sid, turn_ids in wanted.items():
        entry = entries.get(sid)
        if entry is None or not entry.partial or entry.record is None:
            continue
        held = entry.record.facts.turns
        pairs += [(sid, t) for t in sorted(turn_ids) if t not in held]
    if not pairs:
        return 0
    found = await turn_rows(conn, pairs)
    for sid, rows in found.items():
        entry = entries[sid]
        assert entry.record is not None
        record = entry.record.with_stored_turns(decode_turns(sid, rows))
        entries[sid] = replace(entry, record=record)
    return sum(len(rows) for rows in found.values())


async def turn_rows(conn: asyncpg.Connection, pairs: list[tuple[str, str]]) -> TurnRows:
    """The stored facts of the (session id, turn id) given, by session."""
    if not pairs:
        return {}
    found: TurnRows = {}
    for sid, turn_id, facts in await conn.fetch(
        "SELECT t.session_id, t.turn_id, t.facts FROM turns t"
        " JOIN unnest($1::text[], $2::text[]) AS k (session_id, turn_id)"
        " ON t.session_id = k.session_id AND t.turn_id = k.turn_id ORDER BY t.position",
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    ):
        found.setdefault(sid, []).append((turn_id, facts))
    return found


async def _select(conn: asyncpg.Connection, sql: str, sessions: list[str]) -> TurnRows:
    found: TurnRows = {}
    if sessions:
        for sid, turn_id, facts in await conn.fetch(sql, sessions):
            found.setdefault(sid, []).append((turn_id, facts))
    return found
