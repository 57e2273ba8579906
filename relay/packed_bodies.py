"""Changes and facts as the store keeps them: deflated against a dictionary of their shape.

A state change repeats the session's and the turn's snapshots in full (the session's
holds its last turn once more), about 1.4 KB of JSON whose keys are the same in every
change and whose values mostly repeat within it: the session id, the timestamps. A
session's or a turn's facts (`relay.store.facts`) are JSON of a few events, alike in the
same way. Each value is deflated on its own (so that any one is read alone) with a
preset dictionary, a value of the same shape, which makes the keys cost almost nothing:
a stored change is about a ninth of its JSON. Reading inflates it back to the same bytes.

On PostgreSQL, whose rows cost more than SQLite's, snapshots and events' payloads are
packed as well (an event's with a dictionary of events: it is read back byte for byte).

A packed value starts with a byte no JSON starts with, which names its dictionary; a
value stored before values were packed (JSON) is read as it is. The dictionaries are
part of the stored format: they never change; another one would come with a marker of
its own.
"""

from __future__ import annotations

import zlib

CHANGE = b"\x01"  # a change's body, or a session's or a turn's snapshot (SQLite)
FACTS = b"\x02"  # a session's or a turn's facts
EVENT = b"\x03"  # an event's payload as received (PostgreSQL), where packing shrinks it

_CHANGE_DICTIONARY = (
    b'"status":"failed","error":{"message":"","code":""},"retry_after_seconds":null,'
    b'"readiness":"provisioning","runtime_reused":true,"scope_activated":true,'
    b'"turn_status":"idle",{"id":0,"type":"session.ready",'
    b'"occurred_at":"2026-01-01T00:00:00.000Z","session_id":"chat_0000000",'
    b'"turn_id":"turn_0","session":{"session_id":"chat_0000000","provider":"agent",'
    b'"readiness":"ready","runtime_reused":null,"scope_activated":false,"worker_ready":true,'
    b'"created_at":"2026-01-01T00:00:00.000Z","ready_at":"2026-01-01T00:00:00.000Z",'
    b'"time_to_ready_ms":0,"turn_status":"running","active_turn_id":"turn_0",'
    b'"last_turn":{"session_id":"chat_0000000","turn_id":"turn_0","status":"completed",'
    b'"started_at":"2026-01-01T00:00:00.000Z","ended_at":"2026-01-01T00:00:00.000Z",'
    b'"duration_ms":0,"usage":{"input_tokens":0,"output_tokens":0,"reasoning_tokens":0,'
    b'"total_tokens":0,"cost_micros":0},"error":null,"active_turn_id":null,'
    b'"retry_after_seconds":null,"updated_at":"2026-01-01T00:00:00.000Z",'
    b'"tool_calls":{"count":0,"running":[]},"version":0},'
    b'"counts":{"turns":0,"completed":0,"failed":0,"conflicts":0},"usage":null,'
    b'"first_event_at":"2026-01-01T00:00:00.000Z","last_event_at":"2026-01-01T00:00:00.000Z",'
    b'"version":0},"turn":{"session_id":"chat_0000000","turn_id":"turn_0","status":"running",'
    b'"started_at":"2026-01-01T00:00:00.000Z","ended_at":null,"duration_ms":null,"usage":null,'
    b'"error":null,"active_turn_id":null,"retry_after_seconds":null,'
    b'"updated_at":"2026-01-01T00:00:00.000Z","tool_calls":{"count":0,"running":[]},'
    b'"version":0},"cause":{"event_id":"evt_0000000","source":"agent","type":"turn.started"}}'
)
_FACTS_DICTIONARY = (
    b'"error":{"message":"","code":""},"retry_after_seconds":0,"conflict":'
    b'{"format":1,"version":0,"first_event_at":"2026-01-01T00:00:00.000000+00:00",'
    b'"last_event_at":"2026-01-01T00:00:00.000000+00:00","created":{"source":"agent",'
    b'"id":"evt_0000000","type":"agent.chat.session.created",'
    b'"occurred_at":"2026-01-01T00:00:00.000000+00:00","provider":"agent"},'
    b'"runtime":{"source":"agent","id":"evt_0000000","type":"agent.runtime.reused",'
    b'"occurred_at":"2026-01-01T00:00:00.000000+00:00","provider":"agent"},'
    b'"first_ready":{"source":"agent","id":"evt_0000000","type":"agent.worker.ready",'
    b'"occurred_at":"2026-01-01T00:00:00.000000+00:00","provider":"agent"},'
    b'"last_ready":"first_ready","providers":["agent"]}'
    b'{"version":0,"started":{"source":"agent","id":"evt_0000000",'
    b'"type":"agent.chat.turn.started","occurred_at":"2026-01-01T00:00:00.000000+00:00",'
    b'"provider":"agent"},"terminal":{"source":"agent","id":"evt_0000000",'
    b'"type":"agent.chat.turn.completed","occurred_at":"2026-01-01T00:00:00.000000+00:00",'
    b'"usage":{"input_tokens":0,"output_tokens":0,"reasoning_tokens":0,"total_tokens":0,'
    b'"cost_micros":0},"provider":"agent"},"usage":"terminal","latest":"terminal"}'
)
# Events as providers send them (Case.dev's shape last: the most common).
_EVENT_DICTIONARY = (
    b'"session_id":"","turn_id":"","timestamp":"","created_at":"","status":"","event":'
    b'"agent.chat.session.created","agent.runtime.reused","agent.scope.activated",'
    b'"agent.chat.turn.failed","error":{"message":"","code":""},"retryAfterSeconds":0,'
    b'"agent.worker.ready","agent.chat.turn.started","sessionId":"",'
    b'{"id":"evt_000000000","type":"agent.chat.turn.completed",'
    b'"occurred_at":"2026-01-01T00:00:00.000000Z","data":{"chatId":"chat_0000000",'
    b'"turnId":"turn_0","usage":{"inputTokens":0,"outputTokens":0,"costMicros":0}}}'
)
_DICTIONARIES = {CHANGE: _CHANGE_DICTIONARY, FACTS: _FACTS_DICTIONARY, EVENT: _EVENT_DICTIONARY}
# Raw deflate (no header or checksum: the marker says what follows) in a 4 KiB window,
# which holds the dictionary and most of a value, with little memory for its matches:
# setting up a larger compressor costs more than compressing a value of this size.
_WINDOW_BITS = -12
_MEMORY_LEVEL = 4


# A compressor per dictionary, set up once: each value is deflated by a copy of it, the
# same state a new compressor given the dictionary would start from (so the same bytes),
# without hashing the dictionary again for every value.
_PRIMED = {
    kind: zlib.compressobj(
        6, zlib.DEFLATED, _WINDOW_BITS, _MEMORY_LEVEL, zlib.Z_DEFAULT_STRATEGY, dictionary
    )
    for kind, dictionary in _DICTIONARIES.items()
}


def pack(value: bytes, kind: bytes) -> bytes:
    """JSON as the store keeps it; `kind` (CHANGE, FACTS or EVENT) names the dictionary."""
    deflate = _PRIMED[kind].copy()
    return kind + deflate.compress(value) + deflate.flush()


def pack_event(payload: bytes) -> bytes:
    """An event's payload as the store keeps it: packed if that is shorter, else as it is
    (a payload is JSON, so it never starts with a marker)."""
    packed = pack(payload, EVENT)
    return packed if len(packed) < len(payload) else payload


def unpack(stored: bytes) -> bytes:
    """The JSON of a stored value, packed or not."""
    dictionary = _DICTIONARIES.get(stored[:1])
    if dictionary is None:
        return stored
    inflate = zlib.decompressobj(-15, dictionary)
    return inflate.decompress(stored[1:]) + inflate.flush()
