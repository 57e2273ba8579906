"""`mapping`: any JSON, read through the source's `[sources.mapping]` table.

JSON pointers (RFC 6901) say where the id, type, session, turn, time, usage, error and
tool call are; `types` maps the platform's event types onto relay's lifecycle. Types not
in the map are stored and change nothing. When the map has no `worker.ready`, a turn
that starts also means the platform's worker is ready.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from relay.events import Event, EventType
from relay.normalize import InvalidEvent, read_error, read_time, read_usage
from relay.providers.base import Context, Events, Frame, at_frame, frame_id

TARGETS: Mapping[str, EventType] = {
    "session.created": EventType.SESSION_CREATED,
    "runtime.started": EventType.RUNTIME_STARTED,
    "runtime.reused": EventType.RUNTIME_REUSED,
    "scope.activated": EventType.SCOPE_ACTIVATED,
    "worker.ready": EventType.WORKER_READY,
    "turn.started": EventType.TURN_STARTED,
    "turn.completed": EventType.TURN_COMPLETED,
    "turn.failed": EventType.TURN_FAILED,
    "turn.conflict": EventType.TURN_CONFLICT,
    "tool.started": EventType.TOOL_STARTED,
    "tool.completed": EventType.TOOL_COMPLETED,
    "turn.activity": EventType.TURN_ACTIVITY,
}
Target = Literal[
    "session.created",
    "runtime.started",
    "runtime.reused",
    "scope.activated",
    "worker.ready",
    "turn.started",
    "turn.completed",
    "turn.failed",
    "turn.conflict",
    "tool.started",
    "tool.completed",
    "turn.activity",
]
UsageField = Literal[
    "input_tokens", "output_tokens", "reasoning_tokens", "total_tokens", "cost_micros"
]


class MappingSettings(BaseModel):
    """`[sources.mapping]`: where a platform's payload keeps each canonical field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = None  # without it (or without a value there): `{stream id}:{index}`
    type: str
    session: str | None = None
    turn: str | None = None
    time: str | None = None  # RFC 3339 text or unix seconds; default: when received
    error: str | None = None  # a string, or an object {message, code}
    active_turn: str | None = None
    retry_after: str | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None
    usage: dict[UsageField, str] = {}
    types: dict[str, Target]

    @field_validator(
        "id",
        "type",
        "session",
        "turn",
        "time",
        "error",
        "active_turn",
        "retry_after",
        "tool_call_id",
        "tool_name",
    )
    @classmethod
    def _pointer(cls, value: str | None) -> str | None:
        if value is not None:
            check_pointer(value)
        return value

    @field_validator("usage")
    @classmethod
    def _usage_pointers(cls, usage: dict[str, str]) -> dict[str, str]:
        for pointer in usage.values():
            check_pointer(pointer)
        return usage


def check_pointer(pointer: str) -> None:
    if pointer and not pointer.startswith("/"):
        raise ValueError(f"{pointer!r} is not a JSON pointer: it must be empty or start with /")
    if "~" in pointer.replace("~0", "").replace("~1", ""):
        raise ValueError(f"{pointer!r} is not a JSON pointer: `~` must be followed by 0 or 1")


def resolve(document: Any, pointer: str) -> Any:
    """The value at `pointer` (RFC 6901), or None where there is none."""
    if not pointer:
        return document
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(document, dict):
            document = document.get(token)
        elif isinstance(document, list) and token.isdigit() and int(token) < len(document):
            document = document[int(token)]
        else:
            return None
    return document


class Mapped:
    name = "mapping"

    def __init__(self, settings: MappingSettings) -> None:
        self.settings = settings
        self.ready_on_turn = "worker.ready" not in settings.types.values()

    def events(self, frames: Sequence[Frame], ctx: Context) -> list[Event]:
        out = Events(self.name, ctx)
        for frame in frames:
            with at_frame(frame):
                self._frame(out, frame, ctx)
        return out.result()

    def _frame(self, out: Events, frame: Frame, ctx: Context) -> None:
        m, data = self.settings, frame.data

        def text(pointer: str | None, field: str) -> str | None:
            value = None if pointer is None else resolve(data, pointer)
            if value is None or value == "":
                return None
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            if not isinstance(value, str) or len(value) > 256:
                raise InvalidEvent(field, f"the value at {pointer} must be a string")
            return value

        theirs = text(m.type, "type")
        if theirs is None:
            raise InvalidEvent("type", f"no event type at {m.type}")
        event_id = text(m.id, "id")
        if event_id is not None:
            frame = Frame(frame.index, data, event_id, frame.name)
        frame_id(frame, ctx)  # an id is required
        target = m.types.get(theirs)
        kind: Any = TARGETS[target] if target is not None else theirs
        session = text(m.session, "session") or ctx.session_id
        turn = text(m.turn, "turn")
        at = self._time(data, ctx)
        usage = None
        if m.usage:
            usage = read_usage({k: resolve(data, p) for k, p in m.usage.items()})
        error = None if m.error is None else read_error(resolve(data, m.error) or None)
        retry = None if m.retry_after is None else resolve(data, m.retry_after)
        if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int | float)):
            raise InvalidEvent("retry_after", f"the value at {m.retry_after} must be a number")
        call, name = text(m.tool_call_id, "tool_call_id"), text(m.tool_name, "tool_name")
        tool = None if call is None else (call, name or "")
        active = text(m.active_turn, "active_turn")
        if kind == EventType.TURN_STARTED and self.ready_on_turn:
            out.add(frame, EventType.WORKER_READY, session, None, suffix=":ready", at=at)
        out.add(
            frame,
            kind,
            session,
            turn,
            at=at,
            usage=usage,
            error=error,
            tool=tool,
            active_turn_id=active,
            retry_after=None if retry is None else float(retry),
        )

    def _time(self, data: Mapping[str, Any], ctx: Context) -> datetime:
        pointer = self.settings.time
        value = None if pointer is None else resolve(data, pointer)
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return read_time({}, datetime.fromtimestamp(value, UTC))
            except (OverflowError, OSError, ValueError):
                raise InvalidEvent("time", f"the value at {pointer} is not a time") from None
        return read_time({"occurred_at": value}, ctx.received_at)
