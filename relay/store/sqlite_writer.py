"""The SQLite writer: everything that runs on the store's one writer thread.

A batch of ingested events is written in one transaction together with what they
cause: the sessions' and turns' new snapshots, the changes (with their ids), and the
alert deadlines. After a crash an event therefore never exists without its changes,
nor a change without its event.

Session records (the state machine's facts) live in an LRU cache on this thread; on a
miss a record is rebuilt by folding the session's stored events, so nothing but the
public snapshots has to be written per event.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson

from relay.changes import (
    RAW_PREFIX,
    REBUILT_FROM_EVENT,
    Commit,
    StoredChange,
    one_line,
    raw_change_of,
)
from relay.events import Event
from relay.state import (
    SessionRecord,
    SessionState,
    TurnState,
    affects_state,
    alert_deadlines,
    apply,
    derive_session,
)
from relay.store import IngestRecord, IngestResult
from relay.store.retention import Pruned, prune_batch
from relay.timefmt import format_time, format_unix, parse_time

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
_AlertKey = tuple[str, str, str]  # (kind, session id, turn id or "")
_CACHE_SESSIONS = 10_000


class BatchWriter:
    def __init__(
        self,
        conn: sqlite3.Connection,
        decode: Decoder,
        turn_stall_seconds: float,
        ready_timeout_seconds: float,
    ) -> None:
        self.conn = conn
        self.decode = decode
        self.turn_stall_seconds = turn_stall_seconds
        self.ready_timeout_seconds = ready_timeout_seconds
        self.last_seq: int | None = None
        self.last_change = 0
        self.cache: OrderedDict[str, SessionRecord] = OrderedDict()
        # The alert rows of each cached session; those of a batch until it commits.
        self.alert_keys: dict[str, frozenset[_AlertKey]] = {}
        self.pending_alert_keys: dict[str, frozenset[_AlertKey]] = {}

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
            base = self.last_seq
            results, rows, last = _plan(batch, {}, base)
            before = conn.total_changes
            _insert_rows(conn, _INSERT_EVENTS, _EVENT_WIDTH, rows, " ON CONFLICT DO NOTHING")
            if conn.total_changes - before != len(rows) // _EVENT_WIDTH:
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                self._read_counters()
                base = self.last_seq
                keys = [(record.event.source, record.event.id) for record in batch]
                results, rows, last = _plan(batch, _existing_seqs(conn, keys), base)
                _insert_rows(conn, _INSERT_EVENTS, _EVENT_WIDTH, rows)
            touched, commit = self._derive(batch, results, base)
            conn.execute("COMMIT")
        except BaseException:
            self._abandon()
            raise
        self.last_seq = last
        self._remember(touched)
        return results, commit

    def _derive(
        self, batch: list[IngestRecord], results: list[IngestResult], base: int
    ) -> tuple[dict[str, SessionRecord], Commit]:
        touched: dict[str, SessionRecord] = {}
        first_seen: dict[str, float] = {}
        turns: dict[tuple[str, str], Any] = {}
        changes: list[StoredChange] = []
        change_rows: list[Any] = []
        latest: dict[str, int] = {}  # newest new event per session, whatever its type
        snapshots = _Snapshots()
        for record, result in zip(batch, results, strict=True):
            event = record.event
            if result.duplicate:
                continue
            changes.append(self._raw_change(record, result.seq, change_rows))
            if event.session_id is None:
                continue
            latest[event.session_id] = result.seq
            if not affects_state(event):
                continue
            session_id = event.session_id
            old = touched[session_id] if session_id in touched else self._record(session_id, base)
            new, caused = apply(old, event)
            assert new is not None
            touched[session_id] = new
            first_seen.setdefault(session_id, record.received_at.timestamp())
            turn_id = event.turn_id
            turn = new.turns.get(turn_id) if turn_id is not None else None
            if turn is not None and (old is None or turn is not old.turns.get(turn_id or "")):
                turns[(session_id, turn.turn_id)] = turn
            for change in caused:
                changes.append(self._change(change.to_dict(snapshots), result.seq, change_rows))
        self._move_activity({sid: seq for sid, seq in latest.items() if sid not in touched})
        _insert_rows(self.conn, _INSERT_CHANGES, 6, change_rows)
        if not touched:
            return touched, Commit(changes, {})
        self._write_state(touched, latest, turns, snapshots)
        self._update_alerts(touched, first_seen)
        versions = {sid: record.session.version for sid, record in touched.items()}
        return touched, Commit(changes, versions)

    def _change(self, body: dict[str, Any], event_seq: int | None, rows: list[Any]) -> StoredChange:
        """Give a change its id and encoding once; its row goes into `rows`."""
        self.last_change += 1
        encoded = orjson.dumps({"id": self.last_change, **body})
        stored = StoredChange(
            self.last_change, body["type"], body["session_id"] or "", body["turn_id"], encoded
        )
        rows += (stored.id, stored.type, stored.session_id, stored.turn_id, event_seq, encoded)
        return stored

    def _raw_change(self, record: IngestRecord, event_seq: int, rows: list[Any]) -> StoredChange:
        """The event's raw change; its row holds no copy of the payload unless the payload
        had to be re-encoded on one line (readers rebuild it from the event's row)."""
        event = record.event
        self.last_change += 1
        payload = one_line(record.body)
        body = raw_change_of(self.last_change, event, payload)
        stored = REBUILT_FROM_EVENT if payload is record.body else body
        change = StoredChange(
            self.last_change, RAW_PREFIX + event.type, event.session_id or "", event.turn_id, body
        )
        rows += (change.id, change.type, change.session_id, change.turn_id, event_seq, stored)
        return change

    def _write_state(
        self,
        touched: dict[str, SessionRecord],
        activity: dict[str, int],
        turns: dict[tuple[str, str], Any],
        snapshots: _Snapshots,
    ) -> None:
        rows: list[Any] = []
        for session_id, record in touched.items():
            session = record.session
            rows += (
                session_id,
                session.version,
                session.readiness.value,
                session.turn_status.value,
                activity[session_id],
                orjson.dumps(snapshots(session)),
            )
        _insert_rows(
            self.conn,
            "INSERT INTO sessions"
            " (session_id, version, readiness, turn_status, activity_seq, snapshot) VALUES ",
            6,
            rows,
            " ON CONFLICT (session_id) DO UPDATE SET version = excluded.version,"
            " readiness = excluded.readiness, turn_status = excluded.turn_status,"
            " activity_seq = excluded.activity_seq, snapshot = excluded.snapshot",
        )
        rows = []
        for (session_id, turn_id), turn in turns.items():
            rows += (
                session_id,
                turn_id,
                turn.status.value,
                turn.version,
                orjson.dumps(snapshots(turn)),
            )
        _insert_rows(
            self.conn,
            "INSERT INTO turns (session_id, turn_id, status, version, snapshot) VALUES ",
            5,
            rows,
            " ON CONFLICT (session_id, turn_id) DO UPDATE SET status = excluded.status,"
            " version = excluded.version, snapshot = excluded.snapshot",
        )

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

    def _update_alerts(self, touched: dict[str, SessionRecord], seen: dict[str, float]) -> None:
        """Keep one deadline row per alert the sessions' state calls for; drop the rest.

        A deadline is due the alert's threshold after the relay first saw its condition;
        a row that already exists keeps its due time and whether it fired. Which rows a
        cached session has is remembered, so only what differs is read or written.
        """
        wanted: dict[str, dict[_AlertKey, float]] = {}
        for session_id, record in touched.items():
            keys = wanted[session_id] = {}
            for deadline in alert_deadlines(
                record, self.turn_stall_seconds, self.ready_timeout_seconds
            ):
                threshold = (
                    self.turn_stall_seconds
                    if deadline.turn_id is not None
                    else self.ready_timeout_seconds
                )
                key = (str(deadline.type), session_id, deadline.turn_id or "")
                keys[key] = seen[session_id] + threshold
        # A session new to this batch is looked up too: its stored events may no longer
        # give it any state (its source read another way now), yet rows may remain.
        have = self._alert_rows([sid for sid in touched if sid not in self.alert_keys])
        stale: list[str] = []
        rows: list[Any] = []
        for session_id, keys in wanted.items():
            known = self.alert_keys.get(session_id)
            if known is None:
                known = have.get(session_id, frozenset())
            stale += [part for key in known if key not in keys for part in key]
            rows += [part for key, due in keys.items() if key not in known for part in (*key, due)]
            self.pending_alert_keys[session_id] = frozenset(keys)
        if stale:
            values = ",".join(["(?, ?, ?)"] * (len(stale) // 3))
            self.conn.execute(
                f"DELETE FROM alerts WHERE (kind, session_id, turn_id) IN (VALUES {values})",
                stale,
            )
        _insert_rows(
            self.conn,
            "INSERT INTO alerts (kind, session_id, turn_id, due_at) VALUES ",
            4,
            rows,
            " ON CONFLICT DO NOTHING",
        )

    def _alert_rows(self, session_ids: list[str]) -> dict[str, frozenset[_AlertKey]]:
        found: dict[str, set[_AlertKey]] = {}
        for chunk, marks in _in_chunks(session_ids):
            for kind, session_id, turn_id in self.conn.execute(
                f"SELECT kind, session_id, turn_id FROM alerts WHERE session_id IN ({marks})",
                chunk,
            ):
                found.setdefault(session_id, set()).add((kind, session_id, turn_id))
        return {session_id: frozenset(keys) for session_id, keys in found.items()}

    def fire_due_alerts(self, now: float) -> Commit:
        """Record every alert due by `now` (unix seconds) as a change, once."""
        conn = self.conn
        due = conn.execute(
            "SELECT kind, session_id, turn_id FROM alerts"
            " WHERE fired_at IS NULL AND due_at <= ? ORDER BY due_at LIMIT 500",
            (now,),
        ).fetchall()
        if not due:
            return Commit()
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._read_counters()
            assert self.last_seq is not None
            changes = []
            change_rows: list[Any] = []
            for kind, session_id, turn_id in due:
                record = self._record(session_id, self.last_seq)
                turn = record.turns.get(turn_id) if record is not None and turn_id else None
                body = {
                    "type": kind,
                    "occurred_at": format_unix(now),
                    "session_id": session_id,
                    "turn_id": turn_id or None,
                    "session": None if record is None else record.session.to_dict(),
                    "turn": None if turn is None else turn.to_dict(),
                    "cause": None,
                }
                changes.append(self._change(body, None, change_rows))
                conn.execute(
                    "UPDATE alerts SET fired_at = ? WHERE kind = ? AND session_id = ?"
                    " AND turn_id = ?",
                    (now, kind, session_id, turn_id),
                )
            _insert_rows(conn, _INSERT_CHANGES, 6, change_rows)
            conn.execute("COMMIT")
        except BaseException:
            self._abandon()
            raise
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
            self.cache.pop(session_id, None)
            self.alert_keys.pop(session_id, None)
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

    # -- session records -------------------------------------------------------------------

    def _record(self, session_id: str, up_to_seq: int) -> SessionRecord | None:
        record = self.cache.get(session_id)
        if record is not None:
            self.cache.move_to_end(session_id)
            return record
        return derive_session(self.stored_events(session_id, up_to_seq))

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

    def _remember(self, touched: dict[str, SessionRecord]) -> None:
        for session_id, record in touched.items():
            self.cache[session_id] = record
            self.cache.move_to_end(session_id)
        self.alert_keys.update(self.pending_alert_keys)
        self.pending_alert_keys.clear()
        while len(self.cache) > _CACHE_SESSIONS:
            session_id, _ = self.cache.popitem(last=False)
            self.alert_keys.pop(session_id, None)

    def _abandon(self) -> None:
        """Roll back; the counters are read again (and the cache dropped) next time."""
        self.last_seq = None
        self.pending_alert_keys.clear()
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def _read_counters(self) -> None:
        """Read the last seq and change id; forget cached records if someone else wrote."""
        last_seq = _max(self.conn, "SELECT max(seq) FROM events")
        if last_seq != self.last_seq:
            self.cache.clear()
            self.alert_keys.clear()
        self.last_seq = last_seq
        self.last_change = _max(self.conn, "SELECT max(id) FROM changes")


class _Snapshots:
    """Each snapshot's dict, made once per batch for its changes and its row alike."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[SessionState | TurnState, dict[str, Any]]] = {}

    def __call__(self, snapshot: SessionState | TurnState) -> dict[str, Any]:
        made = self._made.get(id(snapshot))
        if made is None:  # the snapshot is kept with its dict, so its id stays its own
            made = self._made[id(snapshot)] = (snapshot, snapshot.to_dict())
        return made[1]


def _max(conn: sqlite3.Connection, sql: str) -> int:
    (value,) = conn.execute(sql).fetchone()
    return int(value or 0)


def _plan(
    batch: list[IngestRecord], seqs: dict[tuple[str, str], int], last_seq: int
) -> tuple[list[IngestResult], list[Any], int]:
    """Assign seqs: known events (and repeats within the batch) keep theirs."""
    results = []
    rows: list[Any] = []
    for record in batch:
        event = record.event
        key = (event.source, event.id)
        seq = seqs.get(key)
        if seq is not None:
            results.append(IngestResult(seq, True))
            continue
        last_seq += 1
        seqs[key] = last_seq
        results.append(IngestResult(last_seq, False))
        rows += (
            last_seq,
            event.source,
            event.id,
            event.type,
            event.session_id,
            event.turn_id,
            format_time(event.occurred_at),
            format_time(record.received_at),
            record.body,
        )
    return results, rows, last_seq


def _insert_rows(
    conn: sqlite3.Connection, head: str, width: int, rows: list[Any], tail: str = ""
) -> None:
    step = _CHUNK * width
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        row = "(" + ", ".join("?" * width) + ")"
        conn.execute(head + ",".join([row] * (len(chunk) // width)) + tail, chunk)


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
