"""Scriberr chat runs: chat.run.started, chat.message.created, chat.delta.reasoning,
chat.delta.content, chat.run.completed{usage}, chat.run.failed{error}; every run-scoped
event carries `session_id`, `run_id` (the turn) and `message_id`."""

from __future__ import annotations

from collections.abc import Sequence

from relay.events import Event, EventType, TurnError
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

_OWN_EVENTS = {"chat.run.started", "chat.run.completed", "chat.run.failed"}


class Scriberr:
    name = "scriberr"

    def events(self, frames: Sequence[Frame], ctx: Context) -> list[Event]:
        out = Events(self.name, ctx)
        for frame in frames:
            with at_frame(frame):
                _frame(out, frame, ctx)
        return out.result()

    def text_only(self, name: str | None, data: bytes) -> bool:
        """Frames but the run's own: text (chat.message.created, chat.delta.*)."""
        kind = name or raw_kind(name, data)
        return kind is not None and kind not in _OWN_EVENTS


def _frame(out: Events, frame: Frame, ctx: Context) -> None:
    kind, data = frame_type(frame), frame.data
    session = session_of(frame, ctx, "session_id")
    turn = optional_id(data, "run_id") or ctx.stream_id
    if kind == "chat.run.started":
        # The platform answering means its worker is ready (Scriberr reports no readiness).
        out.add(frame, EventType.WORKER_READY, session, None, suffix=":ready")
        out.add(frame, EventType.TURN_STARTED, session, turn)
    elif kind == "chat.run.completed":
        out.add(frame, EventType.TURN_COMPLETED, session, turn, usage=read_usage(data.get("usage")))
    elif kind == "chat.run.failed":
        error = read_error(data.get("error") or None) or TurnError("the run failed")
        out.add(frame, EventType.TURN_FAILED, session, turn, error=error)
    else:  # chat.message.created, chat.delta.*: text
        out.text(frame, session, turn)
