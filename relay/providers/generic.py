"""`generic`: canonical JSON, one event a body or a frame (`relay.normalize.normalise_generic`)."""

from __future__ import annotations

from collections.abc import Sequence

from relay.events import Event
from relay.normalize import normalise_generic
from relay.providers.base import Context, Frame, at_frame, frame_id, frame_type


class Generic:
    name = "generic"

    def events(self, frames: Sequence[Frame], ctx: Context) -> list[Event]:
        events = []
        for frame in frames:
            with at_frame(frame):
                data = frame.data
                body = {
                    **data,
                    "id": data.get("id") or frame_id(frame, ctx),
                    "type": frame.name or frame_type(frame),
                    "session_id": data.get("session_id") or ctx.session_id,
                }
                events.append(normalise_generic(ctx.source, body, ctx.received_at))
        return events
