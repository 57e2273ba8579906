"""Case.dev's chat stream frames (`/respond`, `/stream`): turn.started, turn.status,
message.*, session.usage, turn.completed. Its `agent.*` webhooks are read by
`relay.normalize.normalise_casedev`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from relay.events import Event, EventType, TurnError, Usage
from relay.normalize import optional_id, read_error, read_usage
from relay.providers.base import (
    Context,
    Events,
    Frame,
    at_frame,
    frame_type,
    raw_kind,
    session_of,
)

_SESSION = ("chatId", "sessionId", "session_id", "chat_id")
_TOOL_ENDED = {"completed", "error", "failed", "cancelled"}
_OWN_EVENTS = {"turn.started", "turn.completed", "turn.failed", "session.usage"}


class CaseDev:
    name = "casedev"

    def events(self, frames: Sequence[Frame], ctx: Context) -> list[Event]:
        out = Events(self.name, ctx)
        for frame in frames:
            with at_frame(frame):
                _frame(out, frame, ctx)
        return out.result()

    def text_only(self, name: str | None, data: bytes) -> bool:
        """Frames but the turn's and usage's, with no part that may be a tool: text."""
        if b'"tool"' in data or b"\\u" in data:
            return False
        kind = name or raw_kind(name, data)
        return kind is not None and kind not in _OWN_EVENTS


def _frame(out: Events, frame: Frame, ctx: Context) -> None:
    kind, data = frame_type(frame), frame.data
    session = session_of(frame, ctx, *_SESSION)
    turn = optional_id(data, "turnId", "turn_id") or ctx.stream_id
    if kind == "turn.started":
        out.add(frame, EventType.TURN_STARTED, session, turn)
    elif kind == "turn.completed":
        out.add(frame, EventType.TURN_COMPLETED, session, turn, usage=read_usage(data.get("usage")))
    elif kind == "turn.failed":
        error = read_error(data.get("error")) or TurnError("the turn failed")
        out.add(frame, EventType.TURN_FAILED, session, turn, error=error)
    elif kind == "session.usage":
        out.add(frame, EventType.TURN_ACTIVITY, session, turn, usage=_usage(data))
    elif (call := _tool_call(data)) is not None:
        tool, ended = call
        kind_ = EventType.TOOL_COMPLETED if ended else EventType.TOOL_STARTED
        out.add(frame, kind_, session, turn, tool=tool)
    else:
        out.text(frame, session, turn)


def _usage(data: Mapping[str, Any]) -> Usage | None:
    """`usage`, with `summary.costMicros` (LLM plus the tool and API calls correlated to
    the turn) as the turn's cost when given."""
    usage = read_usage(data.get("usage") or {})
    summary = read_usage(data.get("summary")) if isinstance(data.get("summary"), dict) else None
    if usage is not None and summary is not None and "costMicros" in data["summary"]:
        usage = replace(usage, cost_micros=summary.cost_micros)
    return usage


def _tool_call(data: Mapping[str, Any]) -> tuple[tuple[str, str], bool] | None:
    """A `message.part.updated` frame whose part is a tool call: ((call id, tool), ended)."""
    part = data.get("part")
    if not isinstance(part, dict) or part.get("type") != "tool":
        return None
    call = optional_id(part, "callID", "callId", "call_id", "id")
    if call is None:
        return None
    state = part.get("state")
    status = state.get("status") if isinstance(state, dict) else part.get("status")
    return (call, optional_id(part, "tool", "name") or ""), status in _TOOL_ENDED
