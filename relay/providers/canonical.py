"""How a minted event is stored: canonical JSON that the `generic` normaliser reads back.

The writer and every rebuild read stored events with their source's normaliser, so an
event a provider made from a frame (with ids, times and sessions the frame alone does
not give) is stored in the form that reads back as the same event.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import orjson

from relay.events import Event
from relay.timefmt import format_time


def encode(event: Event) -> bytes:
    data: dict[str, Any] = {
        "session_id": event.session_id,
        "turn_id": event.turn_id,
        "usage": None if event.usage is None else asdict(event.usage),
        "error": None if event.error is None else asdict(event.error),
        "active_turn_id": event.active_turn_id,
        "retry_after_seconds": event.retry_after_seconds,
        "tool_call_id": event.tool_call_id,
        "tool_name": event.tool_name,
    }
    body = {
        "id": event.id,
        "type": event.type,
        "occurred_at": format_time(event.occurred_at),
        "session_id": event.session_id,
        "turn_id": event.turn_id,
        "provider": event.provider,
        "data": {**{k: v for k, v in data.items() if v is not None}, "frame": event.data},
    }
    return orjson.dumps({k: v for k, v in body.items() if v is not None})
