"""Session facts as stored: compact, so that a session that has left a writer's cache
is loaded in one read instead of by replaying its events.

A session's own facts (`session_facts.facts`) and each turn's (`turns.facts`) are kept
apart, so that a batch writes only the turns it touched, however many the session has.
Each is a JSON object of the fields that are set, by name, so that facts written by one
version of the state machine are read by the next (a field it adds is absent from older
rows and takes its default). An event is an object of its set fields without its
session id (the row says it), and within a turn without its turn id. An event a turn
holds twice (its terminal event is most often its usage event too) is written the
second time as the name of the first field that holds it. The JSON is stored packed
(`relay.packed_bodies`); facts stored as plain JSON are read as well.

A session's facts also keep what its snapshot sums over its turns (counts, usage, which
turn is the last), so a session is read back with its last turn and the places of its
running turns only; any other turn is read when an event for it arrives. Facts stored
before they kept the sums are read with all their turns (and keep them once written).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import orjson

from relay.events import Event, Usage
from relay.packed_bodies import FACTS, pack, unpack
from relay.state import Facts, RunKey, SessionRecord, StoredSummary, TurnCounts, TurnFacts

_FORMAT = 1
_ALWAYS = ("source", "id", "type", "occurred_at")  # every event has them
_OPTIONAL = tuple(
    f.name
    for f in dataclasses.fields(Event)
    if f.name not in (*_ALWAYS, "session_id", "turn_id", "data")
)


def _kinds(cls: type) -> dict[str, str]:
    """How each field of a facts class is stored: "event", "set", "time" or "plain"."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        origins = {typing.get_origin(arg) or arg for arg in args}
        if Event in origins:
            kinds[name] = "event"
        elif origins & {frozenset, set}:
            kinds[name] = "set"
        elif datetime in origins:
            kinds[name] = "time"
        else:
            kinds[name] = "plain"
    return kinds


def _nested() -> dict[str, type]:
    """The Event fields that hold a dataclass (usage, error), with its class."""
    found = {}
    for name, hint in typing.get_type_hints(Event).items():
        for arg in typing.get_args(hint) or (hint,):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                found[name] = arg
    return found


_SESSION_KINDS = tuple((k, v) for k, v in _kinds(Facts).items() if k not in ("session_id", "turns"))
_TURN_KINDS = tuple(_kinds(TurnFacts).items())
_NESTED = _nested()
# The mapping type a session's facts keep their turns in (built from a dict).
_TURNS_TYPE: Any = type(Facts("", datetime.min, datetime.min).turns)


def encode_session(record: SessionRecord) -> bytes:
    """The session's own facts (its turns' go into their rows: `encode_turn`), with what
    its snapshot sums over all its turns (counts, usage, the last turn's id), so that it
    is read back without its other turns (`last_turn_of`, `run_key`, `decode_record`)."""
    out: dict[str, Any] = {"format": _FORMAT, "version": record.session.version}
    _encode_fields(record.facts, _SESSION_KINDS, out, turn=True)
    summary = record.summary
    last = summary.last_turn
    out["summary"] = {
        "counts": _numbers(summary.counts),
        "usage": _numbers(summary.usage),
        "last_turn": None if last is None else last.turn_id,
    }
    return pack(orjson.dumps(out), FACTS)


def _numbers(counters: TurnCounts | Usage) -> list[int]:
    """A flat dataclass of counters as a list, in field order (faster than `astuple`)."""
    return [getattr(counters, name) for name in counters.__slots__]


def last_turn_of(facts: bytes) -> tuple[bool, str | None]:
    """Whether the stored session facts need all of the session's turns to be read back
    (stored before they summed their turns), and else the id of its last turn, which is
    read with its running turns."""
    summary = orjson.loads(unpack(facts)).get("summary")
    return (True, None) if summary is None else (False, summary["last_turn"])


def encode_turn(record: SessionRecord, turn_id: str) -> bytes:
    """One turn's facts and its snapshot's version."""
    out: dict[str, Any] = {"version": record.turns[turn_id].version}
    _encode_fields(record.facts.turns[turn_id], _TURN_KINDS, out, turn=False)
    return pack(orjson.dumps(out), FACTS)


def decode_turns(
    session_id: str, rows: Iterable[tuple[str, bytes]]
) -> dict[str, tuple[TurnFacts, int]]:
    """Stored turns' facts by turn id (in the order given), each with its snapshot's
    version."""
    out = {}
    for turn_id, blob in rows:
        turn = orjson.loads(unpack(blob))
        fields = _decode_fields(turn, _TURN_KINDS, session_id, turn_id)
        out[turn_id] = (TurnFacts(**fields), turn["version"])
    return out


def run_key(turn_id: str, facts: bytes) -> RunKey:
    """A running turn's place among the running ones, read from its stored facts without
    decoding them: when it started or, if it has not, its newest event (`latest`)."""
    data = orjson.loads(unpack(facts))
    event = data.get("started") or data["latest"]
    if isinstance(event, str):  # written once: the name of the field that holds it
        event = data[event]
    return (datetime.fromisoformat(event["occurred_at"]), turn_id)


def decode_record(
    session_id: str,
    facts: bytes,
    turns: Iterable[tuple[str, bytes]],
    running: Mapping[str, RunKey] | None = None,
) -> SessionRecord:
    """The record written by `encode_session` and `encode_turn` (turns in first-seen order;
    facts stored before they were packed, JSON, are read alike). The turns given are all
    of the session's, or (facts that sum their turns) at least its last one and its
    running ones, or else the places of those (`running`, from `run_key`): the others are
    read when an event for one comes (`decode_turns`)."""
    data = orjson.loads(unpack(facts))
    if data.get("format") != _FORMAT:
        raise ValueError(f"unknown session facts format {data.get('format')!r}")
    stored = decode_turns(session_id, turns)
    turn_facts = {turn_id: turn for turn_id, (turn, _) in stored.items()}
    versions = {turn_id: version for turn_id, (_, version) in stored.items()}
    fields = _decode_fields(data, _SESSION_KINDS, session_id, None)
    session = Facts(session_id=session_id, turns=_TURNS_TYPE(turn_facts), **fields)
    summary = data.get("summary")
    if summary is None:
        return SessionRecord.rebuild(session, data["version"], versions)
    kept = StoredSummary(
        TurnCounts(*summary["counts"]), Usage(*summary["usage"]), summary["last_turn"], running
    )
    return SessionRecord.restore(session, data["version"], versions, kept)


def _encode_fields(
    facts: Any, kinds: tuple[tuple[str, str], ...], out: dict[str, Any], turn: bool
) -> None:
    held: list[tuple[str, Event]] = []  # the events written so far, by field
    for name, kind in kinds:
        value = getattr(facts, name)
        if value is None:
            continue
        if kind == "event":
            for earlier, event in held:
                if event is value:
                    out[name] = earlier
                    break
            else:
                out[name] = _event(value, turn)
            held.append((name, value))
        elif kind == "set":
            if value:
                out[name] = sorted(value)
        else:
            out[name] = value  # orjson writes datetimes as RFC 3339


def _decode_fields(
    data: dict[str, Any], kinds: tuple[tuple[str, str], ...], session_id: str, turn_id: str | None
) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, kind in kinds:
        value = data.get(name)
        if value is None:
            continue
        if kind == "event":
            fields[name] = (
                fields[value] if isinstance(value, str) else _from(value, session_id, turn_id)
            )
        elif kind == "set":
            fields[name] = frozenset(tuple(v) if isinstance(v, list) else v for v in value)
        elif kind == "time":
            fields[name] = datetime.fromisoformat(value)
        else:
            fields[name] = value
    return fields


def _event(event: Event, turn: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "source": event.source,
        "id": event.id,
        "type": event.type,
        "occurred_at": event.occurred_at,
    }
    for name in _OPTIONAL:
        value = getattr(event, name)
        if value is not None:
            out[name] = value  # orjson writes a dataclass (usage, error) as an object
    if turn and event.turn_id is not None:
        out["turn_id"] = event.turn_id
    return out


def _from(data: dict[str, Any], session_id: str, turn_id: str | None) -> Event:
    known = {name: data[name] for name in _OPTIONAL if name in data}
    for name, cls in _NESTED.items():
        if name in known:
            known[name] = cls(**known[name])
    return Event(
        data["source"],
        data["id"],
        data["type"],
        datetime.fromisoformat(data["occurred_at"]),
        session_id,
        data.get("turn_id", turn_id),
        **known,
    )
