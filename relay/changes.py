"""Committed changes as the store hands them to the fan-out: encoded once, with their ids."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson

from relay.events import Event
from relay.packed_bodies import unpack
from relay.timefmt import format_time

RAW_PREFIX = "raw."
RAW_TYPES = ("raw.*",)  # raw events, which a filter gets only when it names them


@dataclass(frozen=True, slots=True)
class StoredChange:
    id: int
    type: str
    session_id: str
    turn_id: str | None
    body: bytes  # the change object as JSON (one line), exactly as subscribers receive it
    _frame: bytes = field(default=b"", repr=False, compare=False)
    _chunk: bytes = field(default=b"", repr=False, compare=False)

    @property
    def frame(self) -> bytes:
        """The change as one Server-Sent Events frame, encoded once for every subscriber
        (on first use: most changes, the raw ones above all, may never be streamed)."""
        if not self._frame:
            object.__setattr__(self, "_frame", sse_frame(self.id, self.type, self.body))
        return self._frame

    @property
    def chunk(self) -> bytes:
        """The frame framed as one HTTP/1.1 chunk."""
        if not self._chunk:
            object.__setattr__(self, "_chunk", as_chunk(self.frame))
        return self._chunk


_FRAME_BREAKING = re.compile("[\x00-\x1f\x7f]")
_LINE_BREAKS = re.compile(rb"\r\n|\r|\n")


def sse_frame(change_id: int, event_type: str, data: bytes) -> bytes:
    """One Server-Sent Events frame that no stored value can split into more: control
    characters in the name are written as `\\xNN`, and data with line breaks (never the
    case for JSON written by the relay) goes on several `data:` lines, which a client joins
    back together."""
    if _FRAME_BREAKING.search(event_type) is not None:
        event_type = _FRAME_BREAKING.sub(lambda m: f"\\x{ord(m.group()):02x}", event_type)
    if b"\n" in data or b"\r" in data:
        data = b"\ndata: ".join(_LINE_BREAKS.split(data))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (
        change_id,
        event_type.encode("utf-8", "backslashreplace"),
        data,
    )


def as_chunk(data: bytes) -> bytes:
    """`data` as one chunk of an HTTP/1.1 chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(frozen=True, slots=True)
class Commit:
    """What one committed transaction produced."""

    changes: list[StoredChange] = field(default_factory=list)
    sessions: Mapping[str, int] = field(default_factory=dict)  # session id -> version


def excluded_types(globs: tuple[str, ...]) -> tuple[str, ...]:
    """What a type filter leaves out before matching: raw events, unless it names types
    (the rule `glob_pattern` applies, for a store to apply in its query)."""
    return () if globs else RAW_TYPES


# Globs have two wildcards: `*` (any run of characters) and `?` (any one character).
# Everything else, `[` and `]` included, stands for itself, in the store's queries
# (`sql_glob`) and in the fan-out (`glob_pattern`) alike.


def glob_regex(glob: str) -> str:
    """The regular expression (for `fullmatch`, with DOTALL) that `glob` means."""
    return "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in glob
    )


def sql_glob(glob: str) -> str:
    """`glob` for SQLite's GLOB operator, whose `[...]` sets are not part of relay's globs."""
    return glob.replace("[", "[[]")


@lru_cache(maxsize=256)
def glob_pattern(globs: tuple[str, ...]) -> re.Pattern[str]:
    """One regular expression matching any of the exact names or globs (`turn.*`).

    No globs at all is the default type filter: every change but raw events.
    """
    if not globs:
        return re.compile(r"(?!raw\.).*", re.DOTALL)
    return re.compile("|".join(f"(?:{glob_regex(g)})" for g in globs), re.DOTALL)


# The body stored for a raw change whose JSON is rebuilt, byte for byte, from its event's
# row: the payload is kept once, in the events table, not a second time in the log.
REBUILT_FROM_EVENT = b""
# The events columns `raw_change_body` reads, in order, for a changes row joined to them.
RAW_EVENT_COLUMNS = (
    "e.type, e.occurred_at, e.session_id, e.turn_id, e.event_id, e.source, e.payload"
)


def raw_change_body(
    change_id: int,
    event_type: str,
    occurred_at: str,
    session_id: str | None,
    turn_id: str | None,
    event_id: str,
    source: str,
    payload: bytes,
) -> bytes:
    """The change that carries a stored event as it arrived (type `raw.<event type>`),
    from the event's columns; `payload` is the event's JSON on one line."""
    return orjson.dumps(
        {
            "id": change_id,
            "type": RAW_PREFIX + event_type,
            "occurred_at": occurred_at,
            "session_id": session_id,
            "turn_id": turn_id,
            "session": None,
            "turn": None,
            "cause": {"event_id": event_id, "source": source, "type": event_type},
            "event": orjson.Fragment(payload),
        }
    )


def raw_change_of(change_id: int, event: Event, payload: bytes) -> bytes:
    """`raw_change_body` for an event at hand (`payload`: its JSON on one line)."""
    return raw_change_body(
        change_id,
        event.type,
        format_time(event.occurred_at),
        event.session_id,
        event.turn_id,
        event.id,
        event.source,
        payload,
    )


def stored_body(change_id: int, body: bytes, event: tuple[Any, ...]) -> bytes:
    """A change's body as read from the log, `event` being its row's RAW_EVENT_COLUMNS
    (all None unless the body is REBUILT_FROM_EVENT): packed bodies are unpacked, and
    bodies stored whole (JSON) are served as they are."""
    if body != REBUILT_FROM_EVENT or event[0] is None:
        return unpack(body) if body else body  # None: a delivery whose change is gone
    event_type, occurred_at, session_id, turn_id, event_id, source, payload = event
    return raw_change_body(
        change_id, event_type, occurred_at, session_id, turn_id, event_id, source, unpack(payload)
    )


def one_line(payload: bytes) -> bytes:
    """An event's JSON on one line, as SSE needs it: `payload` itself if it already is."""
    if b"\n" in payload or b"\r" in payload:
        return orjson.dumps(orjson.loads(payload))
    return payload


def split_list(values: Iterable[str]) -> tuple[str, ...]:
    """Query values that may repeat and may hold comma-separated lists."""
    return tuple(part for value in values for part in value.split(",") if part)
