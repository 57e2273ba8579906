"""`relay check-state` on PostgreSQL: replay every stored event and compare the result
with the stored session and turn snapshots and facts, in one snapshot of the database.

Unlike the embedded check, the change log is not compared event by event: with several
writers, which change an event caused depends on what the other instances had committed.
Once retention has pruned the beginning of the log, a session without stored state may
have had it pruned (its remaining events go next).
"""

from __future__ import annotations

import asyncpg
import orjson

from relay.packed_bodies import unpack
from relay.state import SessionRecord, apply
from relay.store import EventDecoder
from relay.store.facts import decode_record

MAX_REPORTED = 20


async def check_derived_state(conn: asyncpg.Connection, decode: EventDecoder) -> list[str]:
    records: dict[str, SessionRecord] = {}
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for _, source, payload, received_at in conn.cursor(
            "SELECT seq, source, payload, received_at FROM events ORDER BY seq"
        ):
            event = decode(source, unpack(payload), received_at)
            if event.session_id is None:
                continue
            new, _ = apply(records.get(event.session_id), event)
            if new is not None:
                records[event.session_id] = new
        sessions = dict(await conn.fetch("SELECT session_id, snapshot FROM sessions"))
        turns: dict[str, dict[str, tuple[bytes, bytes]]] = {}
        for session_id, turn_id, snapshot, facts in await conn.fetch(
            "SELECT session_id, turn_id, snapshot, facts FROM turns ORDER BY session_id, position"
        ):
            turns.setdefault(session_id, {})[turn_id] = (snapshot, facts)
        facts_rows = dict(
            await conn.fetch("SELECT session_id, facts FROM session_facts WHERE facts IS NOT NULL")
        )
        pruned = bool(
            await conn.fetchval(
                "SELECT (SELECT min(id) FROM changes) > 1 OR (SELECT min(seq) FROM events) > 1"
            )
        )
    problems = []
    for session_id, record in records.items():
        stored = sessions.pop(session_id, None)
        if stored is None and pruned and session_id not in facts_rows:
            continue  # retention took its state
        if stored is None or _unversioned(orjson.loads(unpack(stored))) != _unversioned(
            record.session.to_dict()
        ):
            problems.append(f"session {session_id}: stored state differs from a replay")
        session_turns = turns.pop(session_id, {})
        for turn_id, turn in record.turns.items():
            got = session_turns.get(turn_id)
            if got is None or _unversioned(orjson.loads(unpack(got[0]))) != _unversioned(
                turn.to_dict()
            ):
                problems.append(f"turn {session_id}/{turn_id}: stored state differs")
        facts = facts_rows.pop(session_id, None)
        pairs = [(turn_id, blob) for turn_id, (_, blob) in session_turns.items()]
        if facts is None or decode_record(session_id, facts, pairs).facts != record.facts:
            problems.append(f"session {session_id}: stored facts differ from a replay")
    problems += [f"session {sid} is stored but no event derives it" for sid in sessions]
    return problems[:MAX_REPORTED]


def _unversioned(snapshot: dict[str, object]) -> dict[str, object]:
    """Versions count the steps each instance saw; the states themselves must be equal."""
    out = {key: value for key, value in snapshot.items() if key != "version"}
    last = out.get("last_turn")
    if isinstance(last, dict):
        out["last_turn"] = _unversioned(last)
    return out
