"""The SQLite writer: everything that runs on the store's one writer thread.

A batch of ingested events is written in one transaction together with what they
cause: the sessions' and turns' new snapshots, the changes (with their ids), and the
alert deadlines. After a crash an event therefore never exists without its changes,
nor a change without its event.

What a batch derives is decided by `derive` (shared with the other backends); this
module reads the sessions' facts and writes the rows. Session entries (the state
machine's facts) live in an LRU cache on this thread, bounded in bytes (`entry_cache`);
on a miss they are read from the session's stored facts (`session_facts`, its last
turn's row, its running turns' places and its alert rows), never by replaying its
events, except once for a session stored before facts were (see migration 0009); any
other turn's row is read when an event (or an alert) for that turn comes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from itertools import chain
from typing import Any

from immutables import Map

from relay.changes import Commit
from relay.events import Event
from relay.packed_bodies import CHANGE, pack
from relay.state import RunKey, affects_state, derive_session
from relay.store import IngestRecord, IngestResult
from relay.store.derive import (
    NO_SESSION,
    ChangeDraft,
    Derived,
    SessionEntry,
    Thresholds,
    alert_change,
    decode_fired,
    derive_batch,
    encode_fired,
    number_changes,
    stored_entry,
)
from relay.store.entry_cache import EntryCache
from relay.store.facts import decode_turns, last_turn_of, run_key
from relay.store.retention import Pruned, prune_batch
from relay.timefmt import format_unix, parse_time

Decoder = Callable[[str, bytes, str], Event]  # (source, payload, received_at) -> Event

_EVENT_WIDTH = 9
_INSERT_EVENTS = (
    "INSERT INTO events"
    " (seq, source, event_id, type, session_id, turn_id, occurred_at, received_at, payload)"
    " VALUES "
)
# Each sqlite3 call gives up the GIL and has to win it back from a busy event loop, so a
# batch is written in a handful of multi-row statements rather than one per row.
_INSERT_CHANGES = "INSERT INTO changes (id, type, session_id, turn_id, event_seq, body) VALUES "
_CHUNK = 400
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


class BatchWriter:
    def __init__(
        self,
        conn: sqlite3.Connection,
        decode: Decoder,
        turn_stall_seconds: float,
        ready_timeout_seconds: float,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.conn = conn
        self.decode = decode
        self.thresholds = Thresholds(turn_stall_seconds, ready_timeout_seconds)
        self.last_seq: int | None = None
        self.last_change = 0
        self.cache = EntryCache(cache_bytes)
        self.loaded: dict[str, SessionEntry] = {}  # the batch's sessions read from the store
        self.facts_from_seq: int | None = None  # sessions before may have no facts row
        self.turn_rows_read = 0  # stored turns' facts read into entries, in all

    # -- ingest ----------------------------------------------------------------------------

    def write(self, batch: list[IngestRecord]) -> tuple[list[IngestResult], Commit]:
        """Store new events and their consequences; duplicates keep their first seq.

        The common batch holds only new events: one multi-row INSERT with seqs counted
        on from the last one written. When fewer rows land than were sent (an event
        already stored, or another process wrote meanwhile), the insert is rolled back
        and redone after looking up which events exist.
        """
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self.last_seq is None:
                self._read_counters()
            assert self.last_seq is not None
            self._load_entries(batch)
            derived = derive_batch(batch, {}, self.last_seq, self._entry, self.thresholds)
            before = conn.total_changes
            _insert_rows(
                conn, _INSERT_EVENTS, _EVENT_WIDTH, derived.events, " ON CONFLICT DO NOTHING"
            )
            if conn.total_changes - before != len(derived.events):
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                self._read_counters()
                assert self.last_seq is not None
                keys = [(record.event.source, record.event.id) for record in batch]
                existing = _existing_seqs(conn, keys)
                self._load_entries(batch)
                derived = derive_batch(batch, existing, self.last_seq, self._entry, self.thresholds)
                _insert_rows(conn, _INSERT_EVENTS, _EVENT_WIDTH, derived.events)
            commit, last_change = self._write_derived(derived)
            conn.execute("COMMIT")
        except BaseException:
            self._abandon()
            raise
        if derived.events:
            self.last_seq = derived.events[-1][0]
        self.last_change = last_change
        self._remember(derived.entries)
        self.loaded.clear()
        return derived.results, commit

    def _write_derived(self, derived: Derived) -> tuple[Commit, int]:
        """Write what a batch derived (its events are written); return its commit."""
        conn = self.conn
        changes, rows = number_changes(derived.changes, self.last_change)
        _insert_rows(conn, _INSERT_CHANGES, 6, rows)
        self._move_activity(derived.activity)
        last_change = changes[-1].id if changes else self.last_change
        if not derived.entries:
            return Commit(changes, {}), last_change
        _insert_rows(
            conn,
            "INSERT INTO sessions"
            " (session_id, version, readiness, turn_status, activity_seq, snapshot) VALUES ",
            6,
            [(*row[:5], pack(row[5], CHANGE)) for row in derived.sessions],
            " ON CONFLICT (session_id) DO UPDATE SET version = excluded.version,"
            " readiness = excluded.readiness, turn_status = excluded.turn_status,"
            " activity_seq = excluded.activity_seq, snapshot = excluded.snapshot",
        )
        _insert_rows(
            conn,
            "INSERT INTO turns (session_id, turn_id, status, version, snapshot, facts) VALUES ",
            6,
            [(*row[:4], pack(row[4], CHANGE), row[5]) for row in derived.turns],
            " ON CONFLICT (session_id, turn_id) DO UPDATE SET status = excluded.status,"
            " version = excluded.version, snapshot = excluded.snapshot, facts = excluded.facts",
        )
        _insert_rows(
            conn,
            "INSERT INTO session_facts (session_id, version, facts, fired) VALUES ",
            4,
            derived.facts,
            " ON CONFLICT (session_id) DO UPDATE SET version = excluded.version,"
            " facts = excluded.facts, fired = excluded.fired",
        )
        if derived.alert_deletes:
            conn.executemany(
                "DELETE FROM alerts WHERE session_id = ? AND turn_id = ? AND kind = ?",
                derived.alert_deletes,
            )
        _insert_rows(
            conn,
            "INSERT INTO alerts (session_id, turn_id, kind, due_at) VALUES ",
            4,
            derived.alert_inserts,
            " ON CONFLICT DO NOTHING",
        )
        return Commit(changes, derived.versions), last_change

    def _move_activity(self, latest: dict[str, int]) -> None:
        """Events that change no state still count as a session's newest activity."""
        if not latest:
            return
        values = ",".join(["(?, ?)"] * len(latest))
        self.conn.execute(
            "UPDATE sessions SET activity_seq = v.column2"
            f" FROM (VALUES {values}) AS v WHERE sessions.session_id = v.column1",
            [part for pair in latest.items() for part in pair],
        )

    # -- alerts ----------------------------------------------------------------------------

    def fire_due_alerts(self, now: float) -> Commit:
        """Record every alert due by `now` (unix seconds) as a change, once: its row goes
        and its session's facts remember that it fired, in the change's transaction."""
        conn = self.conn
        due = conn.execute(
            "SELECT session_id, turn_id, kind FROM alerts WHERE due_at <= ?"
            " ORDER BY due_at LIMIT 500",
            (now,),
        ).fetchall()
        if not due:
            return Commit()
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._read_counters()
            drafts: list[ChangeDraft] = []
            fired: dict[str, SessionEntry] = {}
            for session_id, turn_id, kind in due:
                entry = fired.get(session_id) or self._entry(session_id)
                if turn_id:
                    entry = self._holding(session_id, entry, [turn_id])
                record = entry.record
                turn = record.turns.get(turn_id) if record is not None and turn_id else None
                drafts.append(
                    alert_change(
                        kind,
                        format_unix(now),
                        session_id,
                        turn_id,
                        None if record is None else record.session.to_dict(),
                        None if turn is None else turn.to_dict(),
                    )
                )
                key = (kind, turn_id)
                fired[session_id] = replace(
                    entry,
                    stamp=entry.stamp + 1,
                    fired=entry.fired | {key},
                    alerts=entry.alerts.delete(key) if key in entry.alerts else entry.alerts,
                )
            conn.executemany(
                "DELETE FROM alerts WHERE session_id = ? AND turn_id = ? AND kind = ?", due
            )
            conn.executemany(
                "INSERT INTO session_facts (session_id, version, facts, fired)"
                " VALUES (?, ?, NULL, ?) ON CONFLICT (session_id) DO UPDATE"
                " SET version = excluded.version, fired = excluded.fired",
                [(sid, e.stamp, encode_fired(e.fired)) for sid, e in fired.items()],
            )
            changes, rows = number_changes(drafts, self.last_change)
            _insert_rows(conn, _INSERT_CHANGES, 6, rows)
            conn.execute("COMMIT")
        except BaseException:
            self._abandon()
            raise
        self.last_change = changes[-1].id
        self._remember(fired)
        return Commit(changes, {})

    def prune(self, cutoff: float, limit: int) -> Pruned:
        """Delete one small batch of what was received before `cutoff` (see `retention`)."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            pruned = prune_batch(conn, cutoff, limit)
            conn.execute("COMMIT")
        except BaseException:
            self._abandon()
            raise
        for session_id in pruned.sessions:
            self.cache.pop(session_id)
        return pruned

    def probe(self) -> None:
        """Commit a write that changes nothing (the header's user version, rewritten)."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute("COMMIT")
        except BaseException:
            self._abandon()
            raise

    # -- session entries -------------------------------------------------------------------

    def _entry(self, session_id: str) -> SessionEntry:
        entry = self.loaded.get(session_id)  # read for this batch: newer than a cached one
        if entry is not None:
            return entry
        entry = self.cache.get(session_id)
        if entry is not None:
            return entry
        assert self.last_seq is not None
        return self.load_entry(session_id, self.last_seq)

    def _load_entries(self, batch: list[IngestRecord]) -> None:
        """Read the stored facts of the batch's sessions that are not cached, a few
        statements for the whole batch; a session with no facts row is new (or, stored
        before facts were, left to `load_entry`). A session is read with its running
        turns and its last one; a turn of the batch's events that its entry does not
        hold is read then (`_load_turns`)."""
        self.loaded.clear()
        missing = sorted(
            {
                sid
                for r in batch
                if (sid := r.event.session_id) is not None
                and sid not in self.cache
                and affects_state(r.event)
            }
        )
        if missing:
            self._load_sessions(missing)
        self._load_turns(batch)

    def _load_sessions(self, missing: list[str]) -> None:
        rows: dict[str, tuple[int, bytes | None, str]] = {}
        for chunk, marks in _in_chunks(missing):
            for sid, version, facts, fired in self.conn.execute(
                "SELECT session_id, version, facts, fired FROM session_facts"
                f" WHERE session_id IN ({marks})",
                chunk,
            ):
                rows[sid] = (version, facts, fired)
        every: list[str] = []  # facts stored before they summed their turns
        last: dict[str, str | None] = {}
        for sid, (_, facts, _) in rows.items():
            if facts is not None:
                needs_all, last_turn = last_turn_of(facts)
                if needs_all:
                    every.append(sid)
                else:
                    last[sid] = last_turn
        turns = self._select_turns(every, "")
        pairs = [(sid, turn_id) for sid, turn_id in last.items() if turn_id is not None]
        turns.update(self._turn_rows(pairs))
        self.turn_rows_read += sum(len(found) for found in turns.values())
        running: dict[str, dict[str, RunKey]] = {sid: {} for sid in last}
        for sid, found in self._select_turns(list(last), " AND status = 'running'").items():
            running[sid] = {turn_id: run_key(turn_id, facts) for turn_id, facts in found}
        alerts = self._alert_rows(list(last))
        unstored = [sid for sid in missing if rows.get(sid, (0, None, ""))[1] is None]
        legacy = self._stored_before_facts(unstored)
        for sid in missing:
            version, facts, fired = rows.get(sid, (0, None, None))
            if facts is None:
                if sid not in legacy:
                    self.loaded[sid] = NO_SESSION
            else:
                self.loaded[sid] = stored_entry(
                    sid,
                    version,
                    facts,
                    fired,
                    turns.get(sid, []),
                    self.thresholds,
                    running=running.get(sid) if sid in last else None,
                    alerts=alerts.get(sid, ()),
                )

    def _select_turns(
        self, sessions: list[str], condition: str
    ) -> dict[str, list[tuple[str, bytes]]]:
        """The stored facts of the sessions' turns that meet `condition`, by session."""
        turns: dict[str, list[tuple[str, bytes]]] = {}
        for chunk, marks in _in_chunks(sessions):
            for sid, turn_id, facts in self.conn.execute(
                "SELECT session_id, turn_id, facts FROM turns"
                f" WHERE session_id IN ({marks}){condition} ORDER BY rowid",
                chunk,
            ):
                turns.setdefault(sid, []).append((turn_id, facts))
        return turns

    def _alert_rows(self, sessions: list[str]) -> dict[str, list[tuple[str, str]]]:
        """The sessions' alert rows (alerts that can still fire), by session."""
        found: dict[str, list[tuple[str, str]]] = {}
        for chunk, marks in _in_chunks(sessions):
            for sid, turn_id, kind in self.conn.execute(
                f"SELECT session_id, turn_id, kind FROM alerts WHERE session_id IN ({marks})",
                chunk,
            ):
                found.setdefault(sid, []).append((kind, turn_id))
        return found

    def _load_turns(self, batch: list[IngestRecord]) -> None:
        """Read the stored turns of the batch's events that their sessions' entries do
        not hold (an entry read with only its last turn), into those entries."""
        wanted: dict[str, set[str]] = {}
        for r in batch:
            sid, turn_id = r.event.session_id, r.event.turn_id
            if sid is not None and turn_id is not None and affects_state(r.event):
                wanted.setdefault(sid, set()).add(turn_id)
        pairs: list[tuple[str, str]] = []
        entries: dict[str, SessionEntry] = {}
        for sid, turn_ids in wanted.items():
            entry = self.loaded.get(sid) or self.cache.get(sid)
            if entry is None or not entry.partial or entry.record is None:
                continue
            held = entry.record.facts.turns
            unheld = sorted(t for t in turn_ids if t not in held)
            if unheld:
                entries[sid] = entry
                pairs += [(sid, t) for t in unheld]
        if not pairs:
            return
        found = self._turn_rows(pairs)
        self.turn_rows_read += sum(len(rows) for rows in found.values())
        for sid, rows in found.items():
            entry = entries[sid]
            assert entry.record is not None
            record = entry.record.with_stored_turns(decode_turns(sid, rows))
            self.loaded[sid] = replace(entry, record=record)

    def _holding(self, session_id: str, entry: SessionEntry, turn_ids: list[str]) -> SessionEntry:
        """The entry holding the stored turns given (read if it holds only some turns)."""
        record = entry.record
        if not entry.partial or record is None:
            return entry
        unheld = [(session_id, t) for t in turn_ids if t not in record.facts.turns]
        rows = self._turn_rows(unheld).get(session_id) if unheld else None
        if not rows:
            return entry
        self.turn_rows_read += len(rows)
        return replace(entry, record=record.with_stored_turns(decode_turns(session_id, rows)))

    def _turn_rows(self, pairs: list[tuple[str, str]]) -> dict[str, list[tuple[str, bytes]]]:
        """The stored facts of the (session id, turn id) given, by session."""
        found: dict[str, list[tuple[str, bytes]]] = {}
        for start in range(0, len(pairs), _CHUNK):
            chunk = pairs[start : start + _CHUNK]
            for sid, turn_id, facts in self.conn.execute(
                turn_rows_query(len(chunk)), list(chain.from_iterable(chunk))
            ):
                found.setdefault(sid, []).append((turn_id, facts))
        return found

    def _stored_before_facts(self, session_ids: list[str]) -> set[str]:
        """Those of the sessions with no stored facts that have events from before facts
        were stored (migration 0009): they are rebuilt once from their events."""
        if self.facts_from_seq is None:
            return set(session_ids)
        found: set[str] = set()
        if self.facts_from_seq > 1:
            for chunk, marks in _in_chunks(session_ids):
                found.update(
                    row[0]
                    for row in self.conn.execute(
                        f"SELECT DISTINCT session_id FROM events WHERE session_id IN ({marks})"
                        " AND seq < ?",
                        [*chunk, self.facts_from_seq],
                    )
                )
        return found

    def load_entry(self, session_id: str, up_to_seq: int) -> SessionEntry:
        """The session's stored facts; a session stored before facts were is rebuilt
        from its events (up to `up_to_seq`) once, and its facts are then written."""
        conn = self.conn
        row = conn.execute(
            "SELECT version, facts, fired FROM session_facts WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        stamp, facts, fired = row if row is not None else (0, None, None)
        if facts is not None:
            self._load_sessions([session_id])
            return self.loaded.pop(session_id)
        replayed = derive_session(self.stored_events(session_id, up_to_seq))
        alerts = conn.execute(
            "SELECT kind, turn_id FROM alerts WHERE session_id = ?", (session_id,)
        ).fetchall()
        return SessionEntry(
            replayed,
            stamp,
            decode_fired(fired),
            Map(dict.fromkeys(map(tuple, alerts))),
            complete=False,
        )

    def stored_events(self, session_id: str, up_to_seq: int) -> Iterable[Event]:
        rows = self.conn.execute(
            "SELECT source, payload, received_at, event_id, type, turn_id, occurred_at"
            " FROM events WHERE session_id = ? AND seq <= ? ORDER BY seq",
            (session_id, up_to_seq),
        ).fetchall()
        for source, payload, received_at, event_id, event_type, turn_id, occurred_at in rows:
            try:
                yield self.decode(source, payload, received_at)
            except Exception:
                # The source's normaliser no longer reads this payload: fall back to
                # the columns stored beside it, which the state machine mostly needs.
                yield Event(
                    source, event_id, event_type, parse_time(occurred_at), session_id, turn_id
                )

    def _remember(self, entries: dict[str, SessionEntry]) -> None:
        for session_id, entry in entries.items():
            self.cache.put(session_id, entry)

    def _abandon(self) -> None:
        """Roll back; the counters are read again (and the cache dropped) next time."""
        self.last_seq = None
        self.loaded.clear()
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def _read_counters(self) -> None:
        """Read the last seq and change id; forget cached entries if someone else wrote."""
        last_seq = _max(self.conn, "SELECT max(seq) FROM events")
        if last_seq != self.last_seq:
            self.cache.clear()
        self.last_seq = last_seq
        self.last_change = _max(self.conn, "SELECT max(id) FROM changes")
        if self.facts_from_seq is None:
            row = self.conn.execute(
                "SELECT value FROM store_facts WHERE name = 'session_facts_from_seq'"
            ).fetchone()
            self.facts_from_seq = None if row is None else int(row[0])


def _max(conn: sqlite3.Connection, sql: str) -> int:
    (value,) = conn.execute(sql).fetchone()
    return int(value or 0)


def _insert_rows(
    conn: sqlite3.Connection, head: str, width: int, rows: list[tuple[Any, ...]], tail: str = ""
) -> None:
    row = "(" + ", ".join("?" * width) + ")"
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        conn.execute(head + ",".join([row] * len(chunk)) + tail, list(chain.from_iterable(chunk)))


def turn_rows_query(pairs: int) -> str:
    """The stored facts of `pairs` (session id, turn id) turns, bound in that order.

    A join from the pairs, not `(session_id, turn_id) IN (VALUES ...)`: for more than
    one pair SQLite plans that as a scan of every stored turn.
    """
    values = ",".join(["(?, ?)"] * pairs)
    return (
        f"SELECT t.session_id, t.turn_id, t.facts FROM (VALUES {values}) AS v"
        " CROSS JOIN turns AS t ON t.session_id = v.column1 AND t.turn_id = v.column2"
    )


def _in_chunks(values: list[str]) -> Iterator[tuple[list[str], str]]:
    """`values` in chunks small enough for one `IN (...)`, each with its placeholders."""
    for start in range(0, len(values), _CHUNK):
        chunk = values[start : start + _CHUNK]
        yield chunk, ",".join("?" * len(chunk))


def _existing_seqs(
    conn: sqlite3.Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """Seqs of the events among `keys` that are already stored."""
    by_source: dict[str, list[str]] = {}
    for source, event_id in keys:
        by_source.setdefault(source, []).append(event_id)
    found: dict[tuple[str, str], int] = {}
    for source, ids in by_source.items():
        for chunk, marks in _in_chunks(ids):
            sql = f"SELECT event_id, seq FROM events WHERE source = ? AND event_id IN ({marks})"
            for event_id, seq in conn.execute(sql, [source, *chunk]):
                found[(source, event_id)] = seq
    return found
