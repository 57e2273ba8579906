"""Session facts as stored: compact, so that a session that has left a writer's cache
is loaded in one read instead of by replaying its events.

A session's own facts (`session_facts.facts`) and each turn's (`turns.facts`) are kept
apart, so that a batch writes only the turns it touched, however many the session has.
An event a fact refers to is a JSON list `[source, id, type, occurred_at, usage, error,
active_turn_id, retry_after_seconds]` without its trailing nulls (a turn's events need
no session or turn id: the row says them). A turn's usage event is most often its
terminal event; it is then written as the index of that slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson

from relay.events import Event, TurnError, Usage
from relay.state import Facts, SessionRecord, TurnFacts

_FORMAT = 1
_TERMINAL = 2  # the index of the terminal event among a turn's slots


def encode_session(record: SessionRecord) -> bytes:
    """The session's own facts (its turns' go into their rows: `encode_turn`)."""
    f = record.facts
    return orjson.dumps(
        [
            _FORMAT,
            record.session.version,
            f.first_event_at,
            f.last_event_at,
            _event(f.created),
            _event(f.runtime),
            _event(f.scope),
            _event(f.first_ready),
            _event(f.last_ready),
        ]
    )


def encode_turn(record: SessionRecord, turn_id: str) -> bytes:
    """One turn's facts and its snapshot's version."""
    facts = record.facts.turns[turn_id]
    usage: Any = _event(facts.usage, turn=False)
    if facts.usage is not None and facts.usage == facts.terminal:
        usage = _TERMINAL
    return orjson.dumps(
        [
            record.turns[turn_id].version,
            _event(facts.started, turn=False),
            _event(facts.conflict, turn=False),
            _event(facts.terminal, turn=False),
            usage,
        ]
    )


def decode_record(
    session_id: str, facts: bytes, turns: Iterable[tuple[str, bytes]]
) -> SessionRecord:
    """The record written by `encode_session` and `encode_turn` (turns in first-seen order)."""
    data = orjson.loads(facts)
    if data[0] != _FORMAT:
        raise ValueError(f"unknown session facts format {data[0]!r}")
    turn_facts: dict[str, TurnFacts] = {}
    versions: dict[str, int] = {}
    for turn_id, blob in turns:
        turn_version, *slots = orjson.loads(blob)
        events: list[Event | None] = []
        for slot in slots:
            events.append(
                events[slot] if isinstance(slot, int) else _from(slot, session_id, turn_id)
            )
        turn_facts[turn_id] = TurnFacts(*events)
        versions[turn_id] = turn_version
    created, runtime, scope, first_ready, last_ready = (
        _from(slot, session_id, None) for slot in data[4:]
    )
    session = Facts(
        session_id,
        datetime.fromisoformat(data[2]),
        datetime.fromisoformat(data[3]),
        created,
        runtime,
        scope,
        first_ready,
        last_ready,
        turn_facts,
    )
    return SessionRecord.rebuild(session, data[1], versions)


def _event(event: Event | None, turn: bool = True) -> list[Any] | None:
    if event is None:
        return None
    head = [event.source, event.id, event.type, event.occurred_at]  # orjson: RFC 3339, in C
    usage, error, turn_id = event.usage, event.error, event.turn_id if turn else None
    active, retry = event.active_turn_id, event.retry_after_seconds
    if usage is None and error is None and active is None and retry is None and turn_id is None:
        return head  # most events
    tail: list[Any] = [
        None
        if usage is None
        else [
            usage.input_tokens,
            usage.output_tokens,
            usage.reasoning_tokens,
            usage.total_tokens,
            usage.cost_micros,
        ],
        None if error is None else [error.message, error.code],
        active,
        retry,
        turn_id,
    ]
    while tail and tail[-1] is None:
        tail.pop()
    return head + tail


def _from(data: list[Any] | None, session_id: str, turn_id: str | None) -> Event | None:
    if data is None:
        return None
    data = data + [None] * (9 - len(data))
    source, event_id, kind, occurred_at, usage, error, active, retry, own_turn = data
    return Event(
        source,
        event_id,
        kind,
        datetime.fromisoformat(occurred_at),
        session_id,
        own_turn if own_turn is not None else turn_id,
        None,
        None if usage is None else Usage(*usage),
        None if error is None else TurnError(*error),
        active,
        retry,
    )
