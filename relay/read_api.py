"""The read API: JSON views of what the relay has stored."""

from __future__ import annotations

import orjson
from aiohttp import web

from relay.appkeys import STORE
from relay.errors import ApiError, json_response
from relay.store import Store

MAX_LIMIT = 1000


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, "INVALID_PARAMETER", f"{name} must be an integer from {low} to {high}")
    return value


async def list_events(request: web.Request) -> web.Response:
    """`GET /v1/events?after=&limit=`: the raw event log, oldest first."""
    store: Store = request.app[STORE]
    after = int_param(request, "after", 0, 0, 2**62)
    limit = int_param(request, "limit", 100, 1, MAX_LIMIT)
    events = await store.list_events(after, limit)
    items = [
        {
            "seq": e.seq,
            "source": e.source,
            "id": e.id,
            "type": e.type,
            "session_id": e.session_id,
            "turn_id": e.turn_id,
            "occurred_at": e.occurred_at,
            "received_at": e.received_at,
            "payload": orjson.Fragment(e.payload),
        }
        for e in events
    ]
    next_after = events[-1].seq if len(events) == limit else None
    return json_response({"items": items, "next_after": next_after})
