"""LlamaCloud chat sessions: the event union user_input, text, thinking, text_delta,
thinking_delta, tool_call, tool_result, stop{error, is_error, usage}.

Its events name no session (it is in the URL): the request's `session_id` query
parameter gives it. A turn runs from a `user_input` (whose event id is the turn id) to
the next `stop`; frames before any `user_input` belong to the turn named after the stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from relay.events import Event, EventType, TurnError, Usage
from relay.normalize import InvalidEvent, optional_id, read_usage
from relay.providers.base import (
    Context,
    Events,
    Frame,
    at_frame,
    before,
    frame_id,
    frame_type,
    raw_kind,
)

_TEXT = {"text", "thinking", "text_delta", "thinking_delta"}


class LlamaCloud:
    name = "llamacloud"

    def events(self, frames: Sequence[Frame], ctx: Context) -> list[Event]:
        out = Events(self.name, ctx)
        session = ctx.session_id
        turn, opened = ctx.stream_id, None
        for frame in frames:
            with at_frame(frame):
                session = optional_id(frame.data, "session_id") or session
                kind = frame_type(frame)
                if kind == "user_input":
                    if opened is not None:  # the turn before it never stopped
                        _start(out, opened, session, turn, None)
                    turn, opened = frame_id(frame, ctx), frame
                elif kind == "stop":
                    _stop(out, frame, session, turn, opened)
                    opened = None
                elif kind in ("tool_call", "tool_result"):
                    call = optional_id(frame.data, "call_id")
                    if call is None:
                        raise InvalidEvent("call_id", "is required")
                    name = optional_id(frame.data, "name") or ""
                    ended = kind == "tool_result"
                    tool_kind = EventType.TOOL_COMPLETED if ended else EventType.TOOL_STARTED
                    out.add(frame, tool_kind, session, turn, tool=(call, name))
                else:  # text, thinking, their deltas, others
                    out.text(frame, session, turn)
        if opened is not None:
            _start(out, opened, session, turn, None)
        return out.result()

    def text_only(self, name: str | None, data: bytes) -> bool:
        """Text and thinking, whole or in deltas, that name no session."""
        return raw_kind(name, data) in _TEXT and b'"session_id"' not in data


def _start(
    out: Events, frame: Frame, session: str | None, turn: str | None, at: datetime | None
) -> None:
    """The turn starts with its user input; the platform answering means its worker is
    ready (LlamaCloud reports no readiness of its own)."""
    out.add(frame, EventType.WORKER_READY, session, None, suffix=":ready", at=at)
    out.add(frame, EventType.TURN_STARTED, session, turn, at=at)


def _stop(
    out: Events, frame: Frame, session: str | None, turn: str | None, opened: Frame | None
) -> None:
    data = frame.data
    raw = data.get("usage")
    usage: Usage | None = None
    duration = None
    if isinstance(raw, dict):
        duration = raw.get("duration_ms")
        tokens = {"input_tokens": "total_input_tokens", "output_tokens": "total_output_tokens"}
        usage = read_usage({ours: raw.get(theirs) for ours, theirs in tokens.items()})
    elif raw is not None:
        raise InvalidEvent("usage", "must be an object")
    if duration is not None and (
        isinstance(duration, bool) or not isinstance(duration, int | float) or duration < 0
    ):
        raise InvalidEvent("usage.duration_ms", "must be a non-negative number")
    stopped = out.time(frame)
    if opened is None:
        out.add(frame, EventType.WORKER_READY, session, None, suffix=":ready")
    else:  # without a time of its own, the input came `duration_ms` before the stop
        at = out.time(opened) if "occurred_at" in opened.data else before(stopped, duration)
        _start(out, opened, session, turn, at)
    if data.get("is_error") is True:
        message = data.get("error")
        error = TurnError(message if isinstance(message, str) and message else "the run failed")
        out.add(frame, EventType.TURN_FAILED, session, turn, usage=usage, error=error)
    else:
        out.add(frame, EventType.TURN_COMPLETED, session, turn, usage=usage)
