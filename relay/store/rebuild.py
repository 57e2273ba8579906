"""Replays the stored events to check the derived state kept beside them.

Events were applied in seq order when they were stored, so replaying them in that order
must give exactly the stored change log (types, sessions, turns, snapshots) and the
stored session and turn snapshots, versions included. History written before a rule
changed is replayed as that rule then stood (see migration 0006): events stored before
provisioning steps were logged expect no `session.provisioning` for a session that was
already provisioning. Once retention has pruned the log's beginning, events older than
the oldest kept change expect no changes, and a session without stored state may have
had it pruned.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import orjson

from relay.changes import RAW_EVENT_COLUMNS, one_line, raw_change_of, stored_body
from relay.packed_bodies import unpack
from relay.state import ChangeType, Readiness, SessionRecord, apply
from relay.store import EventDecoder
from relay.store.facts import decode_record

MAX_REPORTED = 20


def check_derived_state(conn: sqlite3.Connection, decode: EventDecoder) -> list[str]:
    problems: list[str] = []
    records: dict[str, SessionRecord] = {}
    stored = _stored_changes(conn)
    pruned = _pruned(conn)
    kept_from = min(stored, default=0) if pruned else 0  # the oldest event with changes kept
    steps_from = _fact(conn, "provisioning_steps_from_seq")
    for seq, source, payload, received_at in conn.execute(
        "SELECT seq, source, payload, received_at FROM events ORDER BY seq"
    ).fetchall():
        event = decode(source, payload, received_at)
        session_id = event.session_id
        old = records.get(session_id) if session_id is not None else None
        new, changes = apply(old, event)
        if new is not None and session_id is not None:
            records[session_id] = new
        if seq < steps_from and old is not None and old.session.readiness == Readiness.PROVISIONING:
            changes = [c for c in changes if c.type != ChangeType.SESSION_PROVISIONING]
        expected = [_comparable(orjson.loads(raw_change_of(0, event, one_line(payload))))]
        expected += [_comparable(change.to_dict()) for change in changes]
        found = stored.pop(seq, [])
        if seq < kept_from and not found:
            continue  # its changes were pruned
        if expected != found:
            problems.append(
                f"event seq {seq}: changes {[c['type'] for c in found]}"
                f" stored, {[c['type'] for c in expected]} replayed"
            )
    problems += [f"change for event seq {seq} has no event" for seq in stored]
    problems += _compare_snapshots(conn, records, pruned)
    return problems[:MAX_REPORTED]


def _pruned(conn: sqlite3.Connection) -> bool:
    """Whether retention has deleted derived state or the beginning of the change log."""
    (first,) = conn.execute("SELECT min(id) FROM changes").fetchone()
    return (first is not None and first > 1) or _fact(conn, "pruned_through_seq") > 0


def _fact(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM store_facts WHERE name = ?", (name,)).fetchone()
    return 0 if row is None else int(row[0])


def _stored_changes(conn: sqlite3.Connection) -> dict[int, list[dict[str, Any]]]:
    by_event: dict[int, list[dict[str, Any]]] = {}
    rows = conn.execute(
        f"SELECT c.id, c.event_seq, c.body, {RAW_EVENT_COLUMNS} FROM changes c"
        " LEFT JOIN events e ON c.body = x'' AND e.seq = c.event_seq"
        " WHERE c.event_seq IS NOT NULL ORDER BY c.id"
    )
    for change_id, event_seq, body, *event in rows:
        change = orjson.loads(stored_body(change_id, body, tuple(event)))
        by_event.setdefault(event_seq, []).append(_comparable(change))
    return by_event


def _comparable(change: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in change.items() if key != "id"}


def _compare_snapshots(
    conn: sqlite3.Connection, records: dict[str, SessionRecord], pruned: bool
) -> list[str]:
    problems = []
    sessions = dict(conn.execute("SELECT session_id, snapshot FROM sessions").fetchall())
    turns = {
        (sid, tid): snapshot
        for sid, tid, snapshot in conn.execute("SELECT session_id, turn_id, snapshot FROM turns")
    }
    for session_id, record in records.items():
        expected = record.session.to_dict()
        got = sessions.pop(session_id, None)
        if got is None and pruned:
            continue  # retention took its state; its remaining events go next
        if got is None or orjson.loads(unpack(got)) != expected:
            problems.append(f"session {session_id}: stored state differs from a rebuild")
        for turn_id, turn in record.turns.items():
            got = turns.pop((session_id, turn_id), None)
            if got is None or orjson.loads(unpack(got)) != turn.to_dict():
                problems.append(f"turn {session_id}/{turn_id}: stored state differs")
    problems += _compare_facts(conn, records)
    problems += [f"session {sid} is stored but no event derives it" for sid in sessions]
    problems += [f"turn {sid}/{tid} is stored but no event derives it" for sid, tid in turns]
    return problems


def _compare_facts(conn: sqlite3.Connection, records: dict[str, SessionRecord]) -> list[str]:
    """Stored session facts (what a writer reads on a cache miss) equal a replay's."""
    problems = []
    turns: dict[str, list[tuple[str, bytes]]] = {}
    for session_id, turn_id, facts in conn.execute(
        "SELECT session_id, turn_id, facts FROM turns WHERE facts IS NOT NULL ORDER BY rowid"
    ):
        turns.setdefault(session_id, []).append((turn_id, facts))
    for session_id, facts in conn.execute(
        "SELECT session_id, facts FROM session_facts WHERE facts IS NOT NULL"
    ):
        record = records.get(session_id)
        stored = decode_record(session_id, facts, turns.get(session_id, []))
        if record is None or stored.facts != record.facts or stored.session != record.session:
            problems.append(f"session {session_id}: stored facts differ from a replay")
    return problems
