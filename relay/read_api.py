"""The read API: JSON views of stored events, derived state and the change log."""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

import orjson
from aiohttp import web

from relay.appkeys import HUB, STORE
from relay.changes import split_list
from relay.errors import ApiError, json_response
from relay.store import SessionQuery, StoredEvent

MAX_LIMIT = 1000
MAX_ID = 2**62
MAX_WAIT_SECONDS = 60


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


def _limit(request: web.Request, default: int = 100) -> int:
    return int_param(request, "limit", default, 1, MAX_LIMIT)


def _event_item(e: StoredEvent) -> dict[str, Any]:
    return {
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


async def list_events(request: web.Request) -> web.Response:
    """`GET /v1/events?after=&limit=`: the raw event log, oldest first."""
    after = int_param(request, "after", 0, 0, MAX_ID)
    limit = _limit(request)
    events = await request.app[STORE].list_events(after, limit)
    next_after = events[-1].seq if len(events) == limit else None
    return json_response({"items": [_event_item(e) for e in events], "next_after": next_after})


# -- sessions --------------------------------------------------------------------------------

_READINESS = ("provisioning", "ready")
_TURN_STATUS = ("idle", "running")


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.query.get(name)
    if value is not None and value not in allowed:
        raise ApiError(400, "INVALID_PARAMETER", f"{name} must be one of {', '.join(allowed)}")
    return value


def _encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(parts)).decode().rstrip("=")


def _decode_cursor(request: web.Request) -> list[Any] | None:
    raw = request.query.get("cursor")
    if not raw:
        return None
    try:
        parts = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        parts = None
    if not isinstance(parts, list) or not parts:
        raise ApiError(400, "INVALID_PARAMETER", "cursor is not one this API returned")
    return parts


async def list_sessions(request: web.Request) -> web.Response:
    """`GET /v1/sessions`: newest activity first; cursors hold their snapshot of the order."""
    store = request.app[STORE]
    limit = _limit(request, 50)
    readiness = _choice(request, "readiness", _READINESS)
    turn_status = _choice(request, "turn_status", _TURN_STATUS)
    cursor = _decode_cursor(request)
    if cursor is None:
        as_of, after = await store.last_seq(), None
    else:
        bad_cursor = ApiError(400, "INVALID_PARAMETER", "cursor is not one this API returned")
        try:
            as_of, after = int(cursor[0]), (int(cursor[1]), str(cursor[2]))
        except (IndexError, TypeError, ValueError, OverflowError):
            raise bad_cursor from None
        if not (0 <= as_of <= MAX_ID and 0 <= after[0] <= MAX_ID):
            raise bad_cursor
    rows = await store.list_sessions(SessionQuery(as_of, after, limit, readiness, turn_status))
    next_cursor = None
    if len(rows) == limit:
        last = rows[-1]
        next_cursor = _encode_cursor(as_of, last.activity_seq, last.session_id)
    items = [orjson.Fragment(row.snapshot) for row in rows]
    return json_response({"items": items, "next_cursor": next_cursor})


def _not_found(session_id: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", f"no session {session_id!r}")


async def get_session(request: web.Request) -> web.Response:
    """`GET /v1/sessions/{id}`, optionally holding until `version` is exceeded."""
    store, session_id = request.app[STORE], request.match_info["session_id"]
    wait = request.query.get("wait", "false").lower()
    if wait not in ("true", "false", "1", "0"):
        raise ApiError(400, "INVALID_PARAMETER", "wait must be true or false")
    if wait in ("false", "0"):
        row = await store.get_session(session_id)
        if row is None:
            raise _not_found(session_id)
        return web.Response(body=row.snapshot, content_type="application/json")
    version = int_param(request, "version", 0, 0, MAX_ID)
    timeout = int_param(request, "timeout", 30, 0, MAX_WAIT_SECONDS)
    deadline = time.monotonic() + timeout
    with request.app[HUB].watch_session(session_id) as watch:
        row = await store.get_session(session_id)
        if row is None:
            raise _not_found(session_id)
        while row.version <= version:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await watch.wait(remaining):
                break
            row = await store.get_session(session_id) or row
    return web.Response(body=row.snapshot, content_type="application/json")


async def list_turns(request: web.Request) -> web.Response:
    """`GET /v1/sessions/{id}/turns`: turns in the order they were first seen."""
    store, session_id = request.app[STORE], request.match_info["session_id"]
    if await store.get_session(session_id) is None:
        raise _not_found(session_id)
    cursor = _decode_cursor(request)
    after = _int_cursor(cursor)
    limit = _limit(request)
    rows = await store.list_turns(session_id, after, limit)
    next_cursor = _encode_cursor(rows[-1][0]) if len(rows) == limit else None
    items = [orjson.Fragment(snapshot) for _, snapshot in rows]
    return json_response({"items": items, "next_cursor": next_cursor})


async def list_session_events(request: web.Request) -> web.Response:
    """`GET /v1/sessions/{id}/events`: the session's raw events, oldest first."""
    store, session_id = request.app[STORE], request.match_info["session_id"]
    if await store.get_session(session_id) is None:
        raise _not_found(session_id)
    after = _int_cursor(_decode_cursor(request))
    limit = _limit(request)
    events = await store.list_session_events(session_id, after, limit)
    next_cursor = _encode_cursor(events[-1].seq) if len(events) == limit else None
    return json_response({"items": [_event_item(e) for e in events], "next_cursor": next_cursor})


def _int_cursor(cursor: list[Any] | None) -> int:
    if cursor is None:
        return 0
    value = cursor[0]
    if len(cursor) != 1 or type(value) is not int or not 0 <= value <= MAX_ID:
        raise ApiError(400, "INVALID_PARAMETER", "cursor is not one this API returned")
    return value


async def list_changes(request: web.Request) -> web.Response:
    """`GET /v1/changes?after=&limit=&type=`: the change log, oldest first."""
    after = int_param(request, "after", 0, 0, MAX_ID)
    limit = _limit(request)
    types = split_list(request.query.getall("type", []))
    changes = await request.app[STORE].list_changes(after, limit, types)
    next_after = changes[-1].id if len(changes) == limit else None
    items = [orjson.Fragment(change.body) for change in changes]
    return json_response({"items": items, "next_after": next_after})
