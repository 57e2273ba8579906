"""Motus: one callback per turn, `{session_id, status, response, error, messages?,
trace_metrics: {trace_id, total_duration, total_tokens, has_error}}`, with a bearer token.

Motus gives no turn id but the trace id, and no times: the turn ends when the callback
arrives and started `total_duration` seconds before. Without a trace id, the turn id is
a hash of the callback (its JSON with sorted keys), so the same callback sent twice is
the same turn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from relay.events import Event, EventType, TurnError, Usage
from relay.normalize import InvalidEvent, optional_id, read_error
from relay.providers.base import Context, Events, Frame, at_frame, before

_FAILED = {"error", "interrupted", "failed"}
MAX_DURATION_SECONDS = 10**6


class Motus:
    name = "motus"

    def events(self, frames: Sequence[Frame], ctx: Context) -> list[Event]:
        out = Events(self.name, ctx)
        for frame in frames:
            with at_frame(frame):
                _callback(out, frame, ctx)
        return out.result()


def _callback(out: Events, frame: Frame, ctx: Context) -> None:
    data = frame.data
    session = optional_id(data, "session_id") or ctx.session_id
    if session is None:
        raise InvalidEvent("session_id", "is required")
    metrics = data.get("trace_metrics") or {}
    if not isinstance(metrics, dict):
        raise InvalidEvent("trace_metrics", "must be an object")
    turn = optional_id(metrics, "trace_id") or _stable_id(data)
    frame = Frame(frame.index, data, turn, frame.name)  # ids: `{turn id}:{what}`
    status = data.get("status")
    ended = out.time(frame)
    duration = metrics.get("total_duration")
    if duration is not None and (
        isinstance(duration, bool)
        or not isinstance(duration, int | float)
        or not 0 <= duration <= MAX_DURATION_SECONDS
    ):
        raise InvalidEvent("trace_metrics.total_duration", "must be a number of seconds")
    started = before(ended, None if duration is None else duration * 1000)
    out.add(frame, EventType.WORKER_READY, session, None, suffix=":ready", at=started)
    out.add(frame, EventType.TURN_STARTED, session, turn, suffix=":started", at=started)
    if status == "running":
        return
    tokens = metrics.get("total_tokens")
    usage = None
    if tokens is not None:
        if type(tokens) is not int or tokens < 0:
            raise InvalidEvent("trace_metrics.total_tokens", "must be a non-negative integer")
        usage = Usage(total_tokens=tokens)
    error = read_error(data.get("error") or None)
    if error is not None or metrics.get("has_error") is True or status in _FAILED:
        error = error or TurnError(f"the turn ended with status {status!r}", str(status))
        out.add(
            frame,
            EventType.TURN_FAILED,
            session,
            turn,
            suffix=":ended",
            at=ended,
            usage=usage,
            error=error,
        )
    else:
        out.add(
            frame, EventType.TURN_COMPLETED, session, turn, suffix=":ended", at=ended, usage=usage
        )


def _stable_id(data: Mapping[str, Any]) -> str:
    canonical = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    return "motus_" + hashlib.sha256(canonical).hexdigest()[:32]
