"""What a batch of ingested events writes, derived without I/O for every backend.

A backend loads the facts of the batch's sessions (`SessionEntry`), hands them with the
batch to `derive_batch`, and writes the rows it returns in the same transaction as the
events: the sessions' and touched turns' snapshots and facts, the changes (numbered by
`number_changes` once the backend has taken their ids), the alert rows to insert and
the ones to delete, each by its key.

Alert rows hold only alerts that can still fire. A session's entry knows which alerts
it fired whose condition still holds (`fired`, stored with its facts); the alert rows
it has are then exactly the alerts its state calls for minus those, so no backend needs
to read them before writing: an alert whose condition ends loses its row (or its fired
mark), and an alert that fires loses its row and gains its mark, in the transaction
that writes its change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from immutables import Map

from relay.changes import RAW_PREFIX, REBUILT_FROM_EVENT, StoredChange, one_line, raw_change_of
from relay.events import Event
from relay.packed_bodies import CHANGE, pack
from relay.state import (
    Deadline,
    RunKey,
    SessionRecord,
    SessionState,
    TurnState,
    affects_state,
    alert_deadline_changes,
    alert_deadlines,
    apply,
)
from relay.store import IngestRecord, IngestResult
from relay.store.facts import decode_record, encode_session, encode_turn
from relay.timefmt import format_time

AlertKey = tuple[str, str]  # (alert type, turn id or "") within a session
# A session's alert rows: a persistent set (keys to None), so that a batch that adds or
# removes one costs the same however many the session has (one per running turn).
AlertRows = Map[AlertKey, None]
_NO_ROWS: AlertRows = Map()


@dataclass(frozen=True, slots=True)
class Thresholds:
    turn_stall_seconds: float
    ready_timeout_seconds: float


@dataclass(slots=True)
class SessionEntry:
    """A session's record as a writer knows it, with its alert bookkeeping (treat it as
    immutable: not `frozen`, whose __init__ costs several times more)."""

    record: SessionRecord | None
    stamp: int = 0  # the version of its stored facts row; 0: there is none
    fired: frozenset[AlertKey] = frozenset()  # fired alerts whose condition still holds
    alerts: AlertRows = _NO_ROWS  # its alert rows (alerts that can still fire), as a set
    complete: bool = True  # False: some turns' facts are not stored (rebuilt by a replay)
    partial: bool = False  # the record holds only some turns: the others are read on demand


NO_SESSION = SessionEntry(None)


def entry_of(
    record: SessionRecord | None, stamp: int, fired: Iterable[AlertKey], thresholds: Thresholds
) -> SessionEntry:
    """The entry of stored facts: its alert rows are what its state calls for, unfired."""
    fired = frozenset(fired)
    wanted = set() if record is None else wanted_alerts(record, thresholds)
    return SessionEntry(record, stamp, fired, Map(dict.fromkeys(wanted - fired)))


def wanted_alerts(record: SessionRecord, thresholds: Thresholds) -> set[AlertKey]:
    """The alerts the record's state calls for (as many as it has running turns)."""
    return {
        _alert_key(d)
        for d in alert_deadlines(
            record, thresholds.turn_stall_seconds, thresholds.ready_timeout_seconds
        )
    }


def _alert_key(deadline: Deadline) -> AlertKey:
    return (str(deadline.type), deadline.turn_id or "")


def _threshold(key: AlertKey, thresholds: Thresholds) -> float:
    """An alert's threshold in seconds: a turn's stall, or the session's ready timeout."""
    return thresholds.turn_stall_seconds if key[1] else thresholds.ready_timeout_seconds


def encode_fired(fired: frozenset[AlertKey]) -> str:
    return orjson.dumps(sorted(fired)).decode() if fired else "[]"


def decode_fired(text: str | None) -> frozenset[AlertKey]:
    return frozenset((kind, turn_id) for kind, turn_id in orjson.loads(text or "[]"))


def stored_entry(
    session_id: str,
    stamp: int,
    facts: bytes,
    fired: str | None,
    turns: Iterable[tuple[str, bytes]],
    thresholds: Thresholds,
    running: Mapping[str, RunKey] | None = None,
    alerts: Iterable[AlertKey] = (),
) -> SessionEntry:
    """The entry of a session's stored facts row. Without `running`, `turns` are all its
    turns and its alert rows are what its state calls for; with it (facts that sum their
    turns), `turns` hold at least its last one, `running` places its running ones and
    `alerts` are its stored alert rows: a partial entry."""
    if running is None:
        record = decode_record(session_id, facts, turns)
        return entry_of(record, stamp, decode_fired(fired), thresholds)
    record = decode_record(session_id, facts, turns, running)
    return SessionEntry(
        record, stamp, decode_fired(fired), Map(dict.fromkeys(alerts)), partial=True
    )


@dataclass(slots=True)
class ChangeDraft:
    """A change before it has an id: a state change's body, or a raw event's (treat it
    as immutable)."""

    type: str
    session_id: str
    turn_id: str | None
    event_seq: int | None
    body: dict[str, Any] | None = None  # a state change or an alert
    event: Event | None = None  # a raw change: its event and payload on one line
    payload: bytes = b""
    rebuilt: bool = False  # the raw change's payload is the stored one: rebuilt on read


@dataclass(slots=True)
class Derived:
    """The rows a batch writes. Seqs count on from the `base` given to `derive_batch`."""

    results: list[IngestResult]
    events: list[tuple[Any, ...]]  # (seq, source, event id, type, session, turn, times, body)
    changes: list[ChangeDraft] = field(default_factory=list)
    entries: dict[str, SessionEntry] = field(default_factory=dict)  # the touched sessions
    sessions: list[tuple[Any, ...]] = field(default_factory=list)
    activity: dict[str, int] = field(default_factory=dict)  # untouched sessions' newest seq
    turns: list[tuple[Any, ...]] = field(default_factory=list)  # (..., snapshot, facts)
    facts: list[tuple[Any, ...]] = field(default_factory=list)  # (sid, stamp, facts, fired)
    alert_deletes: list[tuple[str, str, str]] = field(default_factory=list)  # (sid, tid, kind)
    alert_inserts: list[tuple[str, str, str, float]] = field(default_factory=list)

    def shifted(self, by: int) -> Derived:
        """The same rows with every event seq moved by `by` (taken after derivation)."""
        if by == 0:
            return self
        return replace(
            self,
            results=[IngestResult(r.seq + by, r.duplicate) for r in self.results],
            events=[(row[0] + by, *row[1:]) for row in self.events],
            changes=[
                replace(c, event_seq=None if c.event_seq is None else c.event_seq + by)
                for c in self.changes
            ],
            sessions=[(*row[:4], row[4] + by, row[5]) for row in self.sessions],
            activity={sid: seq + by for sid, seq in self.activity.items()},
        )

    @property
    def versions(self) -> dict[str, int]:
        return {
            sid: entry.record.session.version
            for sid, entry in self.entries.items()
            if entry.record is not None
        }


def derive_batch(
    batch: list[IngestRecord],
    existing: dict[tuple[str, str], int],
    base: int,
    lookup: Callable[[str], SessionEntry],
    thresholds: Thresholds,
) -> Derived:
    """Number the batch's new events from `base` (known ones keep their seq, in
    `existing`) and derive what they cause from the sessions' entries."""
    results, events = plan_events(batch, existing, base)
    derived = Derived(results, events)
    touched: dict[str, tuple[SessionEntry, SessionRecord]] = {}
    first_seen: dict[str, float] = {}
    turns: dict[tuple[str, str], None] = {}
    moved: dict[str, set[str]] = {}  # per session, the turns of the events applied
    latest: dict[str, int] = {}  # newest new event per session, whatever its type
    snapshots = _Snapshots()
    changes = derived.changes
    for record, result in zip(batch, results, strict=True):
        event = record.event
        if result.duplicate:
            continue
        changes.append(_raw_change(record, result.seq))
        session_id = event.session_id
        if session_id is None:
            continue
        latest[session_id] = result.seq
        if not affects_state(event):
            continue
        old: SessionRecord | None
        if session_id in touched:
            entry, old = touched[session_id]
        else:
            entry = lookup(session_id)
            old = entry.record
        new, caused = apply(old, event)
        assert new is not None
        touched[session_id] = (entry, new)
        first_seen.setdefault(session_id, record.received_at.timestamp())
        turn_id = event.turn_id
        if turn_id is not None:
            moved.setdefault(session_id, set()).add(turn_id)
        if turn_id is not None and turn_id in new.facts.turns:
            before = None if old is None else old.facts.turns.get(turn_id)
            if new.facts.turns[turn_id] is not before:
                turns[(session_id, turn_id)] = None
        for change in caused:
            changes.append(
                ChangeDraft(
                    str(change.type),
                    change.session_id,
                    change.turn_id,
                    result.seq,
                    change.to_dict(snapshots),
                )
            )
    derived.activity = {sid: seq for sid, seq in latest.items() if sid not in touched}
    for session_id, (entry, new) in touched.items():
        session = new.session
        derived.sessions.append(
            (
                session_id,
                session.version,
                session.readiness.value,
                session.turn_status.value,
                latest[session_id],
                orjson.dumps(snapshots(session)),
            )
        )
        if not entry.complete:  # rebuilt by a replay: store every turn's facts once
            turns.update(((session_id, turn_id), None) for turn_id in new.turns)
    for session_id, turn_id in turns:
        new = touched[session_id][1]
        turn = new.turns[turn_id]
        derived.turns.append(
            (
                session_id,
                turn_id,
                turn.status.value,
                turn.version,
                orjson.dumps(snapshots(turn)),
                encode_turn(new, turn_id),
            )
        )
    for session_id, (entry, new) in touched.items():
        derived.entries[session_id] = _next_entry(
            derived,
            session_id,
            entry,
            new,
            moved.get(session_id, set()),
            first_seen[session_id],
            thresholds,
        )
    return derived


def _next_entry(
    derived: Derived,
    session_id: str,
    entry: SessionEntry,
    record: SessionRecord,
    turn_ids: set[str],
    seen: float,
    thresholds: Thresholds,
) -> SessionEntry:
    """Queue the session's facts row and alert rows; return its entry after the batch.

    Only the alerts of the session and of `turn_ids` (the turns of the batch's events)
    are looked at, however many turns are running. A new alert is due its threshold
    after the relay first saw its condition (in this batch); an alert row that stays
    keeps its due time.
    """
    fired, gone, new = _next_alerts(entry, record, turn_ids, thresholds)
    alerts = entry.alerts
    if gone or new:
        derived.alert_deletes += [(session_id, t, kind) for kind, t in gone]
        derived.alert_inserts += [
            (session_id, t, kind, seen + _threshold((kind, t), thresholds)) for kind, t in new
        ]
        with alerts.mutate() as rows:
            for key in gone:
                del rows[key]
            for key in new:
                rows[key] = None
            alerts = rows.finish()
    stamp = entry.stamp + 1
    derived.facts.append((session_id, stamp, encode_session(record), encode_fired(fired)))
    return SessionEntry(record, stamp, fired, alerts, partial=entry.partial)


def _next_alerts(
    entry: SessionEntry, record: SessionRecord, turn_ids: set[str], thresholds: Thresholds
) -> tuple[frozenset[AlertKey], list[AlertKey], list[AlertKey]]:
    """The fired alerts whose condition still holds after `record`, and the alert rows
    that go and that come.

    The alerts wanted are those of the entry (its rows and fired ones) with the ones the
    batch ended taken out and the ones it began put in. An entry rebuilt by a replay has
    the rows it read, which need not be what its state calls for: all are looked at.
    """
    if not entry.complete or entry.record is None:
        wanted = wanted_alerts(record, thresholds)
        fired = frozenset(key for key in entry.fired if key in wanted)
        rows = wanted - fired
        return fired, [k for k in entry.alerts if k not in rows], sorted(rows - set(entry.alerts))
    added, removed = alert_deadline_changes(
        entry.record,
        record,
        turn_ids,
        thresholds.turn_stall_seconds,
        thresholds.ready_timeout_seconds,
    )
    began = {_alert_key(d) for d in added}
    ended = {_alert_key(d) for d in removed} - began  # a moved due time is in both
    fired = entry.fired - ended if ended and entry.fired else entry.fired
    gone = sorted(key for key in ended if key in entry.alerts)
    new = sorted(key for key in began - fired if key not in entry.alerts)
    return fired, gone, new


def plan_events(
    batch: list[IngestRecord], seqs: dict[tuple[str, str], int], last_seq: int
) -> tuple[list[IngestResult], list[tuple[Any, ...]]]:
    """Assign seqs: known events (and repeats within the batch) keep theirs."""
    results = []
    rows: list[tuple[Any, ...]] = []
    seqs = dict(seqs)
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
        rows.append(
            (
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
        )
    return results, rows


def number_changes(
    drafts: list[ChangeDraft], last_id: int
) -> tuple[list[StoredChange], list[tuple[Any, ...]]]:
    """Give the drafts ids after `last_id`; return them as published and as rows
    (id, type, session id, turn id, event seq, stored body: state changes packed)."""
    changes = []
    rows = []
    for draft in drafts:
        last_id += 1
        if draft.event is not None:
            body = raw_change_of(last_id, draft.event, draft.payload)
            stored = REBUILT_FROM_EVENT if draft.rebuilt else body
        else:
            body = orjson.dumps({"id": last_id, **(draft.body or {})})
            stored = pack(body, CHANGE)
        changes.append(StoredChange(last_id, draft.type, draft.session_id, draft.turn_id, body))
        rows.append((last_id, draft.type, draft.session_id, draft.turn_id, draft.event_seq, stored))
    return changes, rows


def alert_change(
    kind: str,
    occurred_at: str,
    session_id: str,
    turn_id: str,
    session: dict[str, Any] | orjson.Fragment | None,
    turn: dict[str, Any] | orjson.Fragment | None,
) -> ChangeDraft:
    """An alert's change: the session and turn as they stand when it fires."""
    body = {
        "type": kind,
        "occurred_at": occurred_at,
        "session_id": session_id,
        "turn_id": turn_id or None,
        "session": session,
        "turn": turn,
        "cause": None,
    }
    return ChangeDraft(kind, session_id, turn_id or None, None, body)


def _raw_change(record: IngestRecord, event_seq: int) -> ChangeDraft:
    """The event's raw change; its row holds no copy of the payload unless the payload
    had to be re-encoded on one line (readers rebuild it from the event's row)."""
    event = record.event
    payload = one_line(record.body)
    return ChangeDraft(
        RAW_PREFIX + event.type,
        event.session_id or "",
        event.turn_id,
        event_seq,
        event=event,
        payload=payload,
        rebuilt=payload is record.body,
    )


class _Snapshots:
    """Each snapshot's dict, made once per batch for its changes and its row alike."""

    def __init__(self) -> None:
        self._made: dict[int, tuple[SessionState | TurnState, dict[str, Any]]] = {}

    def __call__(self, snapshot: SessionState | TurnState) -> dict[str, Any]:
        made = self._made.get(id(snapshot))
        if made is None:  # the snapshot is kept with its dict, so its id stays its own
            made = self._made[id(snapshot)] = (snapshot, snapshot.to_dict())
        return made[1]
