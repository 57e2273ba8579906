"""Sessions' entries read back from PostgreSQL for a batch, as the SQLite writer reads
them: a session's facts row, its last turn, the places of its running turns and its
alert rows; a turn of the batch's events that an entry does not hold is read then."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    pairs: list[tuple[str, str]] = []
    for sid, turn_ids in _batch_turns(batch).items():
        entry = entries.get(sid)
        if entry is not None:
            pairs += [(sid, t) for t in sorted(turn_ids) if _lacks(entry, t)]
    if not pairs:
        return 0
    found = await turn_rows(conn, pairs)
    return sum(_hold(entries, sid, rows) for sid, rows in found.items())


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


# Lock the batch's sessions' facts rows (inserting those that do not exist yet) and read,
# in the same statement, what building their entries takes: for each session whose row's
# version is not the one cached ("stale"), its running turns, its newest turn, its alert
# rows and the turns of the batch's events; for the others, the turns of the batch's
# events their cached entries lack (`wanted`); and the batch's events already stored.
# Rows: (kind, session id or source, version/position/seq, facts, fired/kind/event id,
# turn id, the version the statement's snapshot saw).
#
# Every part but the lock reads the snapshot the statement started with. A row whose lock
# had to wait for another transaction's commit is returned as that commit left it, so its
# turns and alerts as read here may be older than its facts: the caller uses them only
# where the version the snapshot saw is the locked one (each write of a session's turns or
# alerts moves its version), and reads the others again in statements of their own.
_LOCK_AND_READ = (
    "WITH l AS (INSERT INTO session_facts (session_id, version)"
    " SELECT session_id, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"
    " FROM unnest($1::text[]) AS s (session_id) ORDER BY session_id"
    " ON CONFLICT (session_id) DO UPDATE SET version = session_facts.version"
    " RETURNING session_id, version, facts, fired),"
    " stale AS (SELECT l.session_id FROM l"
    " JOIN unnest($1::text[], $2::bigint[]) AS c (session_id, cached)"
    " ON c.session_id = l.session_id"
    " WHERE l.facts IS NOT NULL AND l.version IS DISTINCT FROM c.cached)"
    " SELECT 0::int AS kind, l.session_id, l.version, l.facts, l.fired, NULL::text AS turn_id,"
    " f.version AS seen FROM l LEFT JOIN session_facts f ON f.session_id = l.session_id"
    " UNION ALL SELECT 1, t.session_id, t.position, t.facts, NULL, t.turn_id, NULL"
    " FROM stale s JOIN turns t ON t.session_id = s.session_id WHERE t.status = 'running'"
    " UNION ALL SELECT 2, s.session_id, t.position, t.facts, NULL, t.turn_id, NULL"
    " FROM stale s CROSS JOIN LATERAL (SELECT position, facts, turn_id FROM turns"
    " WHERE turns.session_id = s.session_id ORDER BY position DESC LIMIT 1) t"
    " UNION ALL SELECT 3, t.session_id, t.position, t.facts, NULL, t.turn_id, NULL"
    " FROM unnest($3::text[], $4::text[], $5::bool[]) AS k (session_id, turn_id, wanted)"
    " JOIN turns t ON t.session_id = k.session_id AND t.turn_id = k.turn_id"
    " WHERE k.wanted OR k.session_id IN (SELECT session_id FROM stale)"
    " UNION ALL SELECT 4, a.session_id, NULL, NULL, a.kind, a.turn_id, NULL"
    " FROM stale s JOIN alerts a ON a.session_id = s.session_id"
    " UNION ALL SELECT 5, e.source, e.seq, NULL, e.event_id, NULL, NULL FROM events e"
    " JOIN unnest($6::text[], $7::text[]) AS k (source, event_id)"
    " ON e.source = k.source AND e.event_id = k.event_id"
)
_RUNNING, _NEWEST, _WANTED, _ALERT, _STORED = 1, 2, 3, 4, 5


@dataclass(slots=True)
class Locked:
    """What `lock_and_read` found: the sessions' entries, the batch's events already
    stored (their seqs), how many turn rows were decoded into entries and how many
    sessions had to be read again in statements of their own."""

    entries: dict[str, SessionEntry]
    existing: dict[tuple[str, str], int]
    turn_rows_read: int
    read_again: int


async def lock_and_read(
    conn: asyncpg.Connection,
    sessions: list[str],
    batch: list[IngestRecord],
    cached: Callable[[str], SessionEntry | None],
    thresholds: Thresholds,
) -> Locked:
    """Lock the sessions' facts rows (`sessions` sorted) and build their entries, from the
    cache where the row's version is the cached one, in one statement; sessions changed by
    a transaction that committed while the lock waited are read again (`load_entries`)."""
    known = {sid: cached(sid) for sid in sessions}
    pairs: list[tuple[str, str, bool]] = []
    for sid, turn_ids in _batch_turns(batch).items():
        entry = known.get(sid)
        pairs += [(sid, t, entry is not None and _lacks(entry, t)) for t in sorted(turn_ids)]
    rows = await conn.fetch(
        _LOCK_AND_READ,
        sessions,
        [None if (entry := known[sid]) is None else entry.stamp for sid in sessions],
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        [p[2] for p in pairs],
        [r.event.source for r in batch],
        [r.event.id for r in batch],
    )
    facts_rows: list[tuple[str, int, bytes | None, str | None, int | None]] = []
    turns: dict[int, dict[str, list[tuple[int, str, bytes]]]] = {
        _RUNNING: {},
        _NEWEST: {},
        _WANTED: {},
    }
    alerts: dict[str, list[tuple[str, str]]] = {}
    existing: dict[tuple[str, str], int] = {}
    for kind, key, number, facts, text, turn_id, seen in rows:
        if kind == 0:
            facts_rows.append((key, number, facts, text, seen))
        elif kind == _STORED:
            existing[(key, text)] = number
        elif kind == _ALERT:
            alerts.setdefault(key, []).append((text, turn_id))
        else:
            turns[kind].setdefault(key, []).append((number, turn_id, facts))
    entries: dict[str, SessionEntry] = {}
    again: list[tuple[str, int, bytes, str | None]] = []
    read = 0
    for sid, version, facts, fired, seen in facts_rows:
        entry = known[sid]
        if entry is not None and entry.stamp == version:
            entries[sid] = entry
        elif facts is None:
            entries[sid] = replace(NO_SESSION, stamp=version)
        elif seen != version or (built := _stale_entry(sid, facts, turns)) is None:
            again.append((sid, version, facts, fired))
        else:
            last, running = built
            entries[sid] = stored_entry(
                sid,
                version,
                facts,
                fired,
                last,
                thresholds,
                running=running,
                alerts=alerts.get(sid, ()),
            )
            read += len(last)
    for sid, found in turns[_WANTED].items():
        entry = entries.get(sid)
        if entry is None:
            continue  # read again below
        lacking = [(turn, facts) for _, turn, facts in sorted(found) if _lacks(entry, turn)]
        if lacking:
            read += _hold(entries, sid, lacking)
    if again:
        loaded, count = await load_entries(conn, again, thresholds)
        read += count + await hold_turns(conn, batch, loaded)
        entries.update(loaded)
    return Locked(entries, existing, read, len(again))


def _stale_entry(
    sid: str, facts: bytes, turns: dict[int, dict[str, list[tuple[int, str, bytes]]]]
) -> tuple[list[tuple[str, bytes]], dict[str, RunKey]] | None:
    """A stale session's last turn (if it has one) and its running turns' places, from
    the rows read with its lock; None where those do not suffice (facts stored before they
    summed their turns, or a last turn that is neither running, the newest nor one of the
    batch's)."""
    needs_all, last_turn = last_turn_of(facts)
    if needs_all:
        return None
    running = sorted(turns[_RUNNING].get(sid, []))
    last: list[tuple[str, bytes]] = []
    if last_turn is not None:
        rows = running + turns[_NEWEST].get(sid, []) + turns[_WANTED].get(sid, [])
        match = next((f for _, turn_id, f in rows if turn_id == last_turn), None)
        if match is None:
            return None
        last.append((last_turn, match))
    return last, {turn_id: run_key(turn_id, f) for _, turn_id, f in running}


def _batch_turns(batch: list[IngestRecord]) -> dict[str, set[str]]:
    """The turns of the batch's events that affect state, by session."""
    wanted: dict[str, set[str]] = {}
    for r in batch:
        sid, turn_id = r.event.session_id, r.event.turn_id
        if sid is not None and turn_id is not None and affects_state(r.event):
            wanted.setdefault(sid, set()).add(turn_id)
    return wanted


def _hold(entries: dict[str, SessionEntry], sid: str, rows: list[tuple[str, bytes]]) -> int:
    """Add these stored turns (id, facts) to the session's entry; how many there were."""
    entry = entries[sid]
    assert entry.record is not None
    entries[sid] = replace(entry, record=entry.record.with_stored_turns(decode_turns(sid, rows)))
    return len(rows)


def _lacks(entry: SessionEntry, turn_id: str) -> bool:
    """Whether an entry that holds only some turns lacks this one."""
    return entry.partial and entry.record is not None and turn_id not in entry.record.facts.turns
