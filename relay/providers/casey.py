"""Casey chat (`POST /api/chat`): one turn per stream, frames metadata{conversation_id},
token, tool_start, tool_end, widget, sources, error, done.

The frames carry no ids: every event is `{stream id}:{frame index}`, and the stream id is
the turn id. Tools are tracked by name: the n-th `tool_end` of a tool ends its n-th
`tool_start`, whose frame names the call. A stream with an `error` frame is a failed
turn (its `done` still follows); otherwise `done` completes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from relay.events import Event, EventType, TurnError
from relay.normalize import InvalidEvent, optional_id
from relay.providers.base import (
    Context,
    Events,
    Frame,
    at_frame,
    frame_id,
    frame_type,
    raw_kind,
)


class Casey:
    name = "casey"

    def events(self, frames: Sequence[Frame], ctx: Context) -> list[Event]:
        out = Events(self.name, ctx)
        session, turn = ctx.session_id, ctx.stream_id
        calls: dict[str, list[str]] = {}  # tool name -> call ids started, in order
        ended: dict[str, int] = {}  # tool name -> how many ended
        error: TurnError | None = None
        for frame in frames:
            with at_frame(frame):
                kind, data = frame_type(frame), frame.data
                if kind == "metadata":
                    session = optional_id(data, "conversation_id") or session
                    out.add(frame, EventType.WORKER_READY, session, None, suffix=":ready")
                    out.add(frame, EventType.TURN_STARTED, session, turn)
                elif kind in ("tool_start", "tool_end"):
                    tool = optional_id(data, "tool")
                    if tool is None:
                        raise InvalidEvent("tool", "is required")
                    started = calls.setdefault(tool, [])
                    if kind == "tool_start":
                        started.append(frame_id(frame, ctx))
                        out.add(
                            frame, EventType.TOOL_STARTED, session, turn, tool=(started[-1], tool)
                        )
                    else:
                        n = ended[tool] = ended.get(tool, 0) + 1
                        call = started[n - 1] if n <= len(started) else frame_id(frame, ctx)
                        out.add(frame, EventType.TOOL_COMPLETED, session, turn, tool=(call, tool))
                elif kind == "error" and error is None:
                    message = data.get("message")
                    error = TurnError(message if isinstance(message, str) else "error")
                    out.add(frame, EventType.TURN_FAILED, session, turn, error=error)
                elif kind == "done" and error is None:
                    out.add(frame, EventType.TURN_COMPLETED, session, turn)
                else:  # token, widget, sources, the `done` after an error, others
                    out.text(frame, session, turn)
        return [e if e.session_id else _with_session(e, session) for e in out.result()]

    def text_only(self, name: str | None, data: bytes) -> bool:
        """Tokens (widgets, sources and a `done` after an error are text too, but rare)."""
        return raw_kind(name, data) == "token"


def _with_session(event: Event, session: str | None) -> Event:
    """Frames before `metadata` (there should be none) take the session it names."""
    return replace(event, session_id=session)
