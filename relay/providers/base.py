"""The provider interface: frames of one request in, canonical events out, with no I/O.

A provider reads every frame of one request at once: a webhook is one frame, a forwarded
stream many. Seeing the whole stream lets a provider mint ids its platform does not give
(`{stream id}:{frame index}`), pair a tool's start with its end, and fold the frames that
only carry text into one activity event per turn instead of one event per token.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from relay.events import Event, EventType, TurnError, Usage
from relay.normalize import InvalidEvent, optional_id, read_time


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a request: an SSE event, an NDJSON line, or a whole JSON body."""

    index: int
    data: Mapping[str, Any]
    id: str | None = None  # the SSE `id:` field
    name: str | None = None  # the SSE `event:` field


@dataclass(frozen=True, slots=True)
class Context:
    """What the request says about its frames besides the frames themselves."""

    source: str
    received_at: datetime
    stream_id: str | None = None  # the request's `{prefix}id` header
    session_id: str | None = None  # the `session_id` query parameter


class Provider(Protocol):
    """Maps one request's frames to canonical events; raises InvalidEvent naming the frame."""

    name: str

    def events(self, frames: Sequence[Frame], ctx: Context) -> list[Event]: ...


@runtime_checkable
class TextHints(Protocol):
    """A provider that tells from a frame's raw bytes, before any parsing, that the frame
    only carries text (a token, a delta): it would give a text event (`Events.text`)
    whose session and turn are those of the text frames next to it. False when unsure."""

    def text_only(self, name: str | None, data: bytes) -> bool: ...


_LONE_TYPE = re.compile(rb'\A\s*\{\s*"type"\s*:\s*"([A-Za-z0-9_.]+)"')


def raw_kind(name: str | None, data: bytes) -> str | None:
    """`frame_type` read from the raw frame: its SSE event name, else the `type` of a JSON
    object that opens with it and names it once (a key repeated later would win), with
    no escape that could spell it otherwise; None when unsure."""
    if name:
        return name
    match = _LONE_TYPE.match(data)
    if match is None or data.count(b'"type"') != 1 or b"\\u" in data:
        return None
    return match.group(1).decode()


@contextmanager
def at_frame(frame: Frame) -> Iterator[None]:
    """Name the frame in any InvalidEvent raised while reading it."""
    try:
        yield
    except InvalidEvent as exc:
        message = str(exc)[len(exc.field) + 2 :]  # InvalidEvent reads "{field}: {message}"
        raise InvalidEvent(f"frame {frame.index}: {exc.field}", message) from None


def frame_type(frame: Frame) -> str:
    """The SSE event name, else the frame's own `type` (or `event`) field."""
    if frame.name:
        return frame.name
    kind = frame.data.get("type", frame.data.get("event"))
    if not isinstance(kind, str) or not kind:
        raise InvalidEvent("type", "is required (an SSE event name or a `type` field)")
    return kind


def frame_id(frame: Frame, ctx: Context) -> str:
    """The frame's own id, else `{stream id}:{frame index}`."""
    if frame.id:
        return frame.id
    if ctx.stream_id is None:
        raise InvalidEvent("id", "the frame has no id and the request names no stream")
    return f"{ctx.stream_id}:{frame.index}"


def session_of(frame: Frame, ctx: Context, *fields: str) -> str | None:
    return optional_id(frame.data, *fields) or ctx.session_id


@dataclass(slots=True)
class Events:
    """Collects one request's canonical events; text frames collapse into one per turn."""

    provider: str
    ctx: Context
    out: list[Event] = field(default_factory=list)
    texts: dict[tuple[str | None, str | None], Event] = field(default_factory=dict)

    def add(
        self,
        frame: Frame,
        kind: EventType,
        session_id: str | None,
        turn_id: str | None,
        *,
        suffix: str = "",
        at: datetime | None = None,
        usage: Usage | None = None,
        error: TurnError | None = None,
        tool: tuple[str, str] | None = None,
        active_turn_id: str | None = None,
        retry_after: float | None = None,
    ) -> Event:
        event = Event(
            self.ctx.source,
            frame_id(frame, self.ctx) + suffix,
            kind,
            at or self.time(frame),
            session_id,
            turn_id,
            frame.data,
            usage,
            error,
            active_turn_id,
            retry_after,
            None if tool is None else tool[0],
            None if tool is None else tool[1],
            self.provider,
        )
        self.out.append(event)
        return event

    def text(self, frame: Frame, session_id: str | None, turn_id: str | None) -> None:
        """A frame that only carries text: it moves the turn's last activity."""
        event = Event(
            self.ctx.source,
            frame_id(frame, self.ctx),
            EventType.TURN_ACTIVITY,
            self.time(frame),
            session_id,
            turn_id,
            frame.data,
            provider=self.provider,
        )
        self.texts[(session_id, turn_id)] = event

    def time(self, frame: Frame) -> datetime:
        return read_time(frame.data, self.ctx.received_at)

    def result(self) -> list[Event]:
        return [*self.out, *self.texts.values()]


def before(moment: datetime, milliseconds: float | None) -> datetime:
    """`moment` less a duration, to the millisecond."""
    if milliseconds is None:
        return moment
    return moment - timedelta(milliseconds=int(milliseconds))
