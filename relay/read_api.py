"""The read API: JSON views of stored events, derived state and the change log."""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

from relay import auth
from relay.api_models import (
    MAX_ID,
    ChangePage,
    ChangesQuery,
    EventLogPage,
    EventLogQuery,
    PageQuery,
    SessionEventPage,
    SessionPage,
    SessionQuery,
    SessionsQuery,
    SessionState,
    TurnPage,
)
from relay.appkeys import HUB, STORE
from relay.changes import excluded_types
from relay.errors import ApiError, json_response
from relay.routes import Handler, Reply, Route, parse_query
from relay.store import SessionQuery as SessionPageQuery
from relay.store import StoredEvent

__all__ = ["routes"]


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
    query = parse_query(request, EventLogQuery)
    events = await request.app[STORE].list_events(query.after, query.limit)
    next_after = events[-1].seq if len(events) == query.limit else None
    return json_response({"items": [_event_item(e) for e in events], "next_after": next_after})


# -- sessions --------------------------------------------------------------------------------


def _encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(parts)).decode().rstrip("=")


def _bad_cursor() -> ApiError:
    return ApiError(400, "INVALID_PARAMETER", "cursor is not one this API returned")


def _decode_cursor(raw: str | None) -> list[Any] | None:
    if not raw:
        return None
    try:
        parts = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError):
        parts = None
    if not isinstance(parts, list) or not parts:
        raise _bad_cursor()
    return parts


async def list_sessions(request: web.Request) -> web.Response:
    """`GET /v1/sessions`: newest activity first; cursors hold their snapshot of the order."""
    store = request.app[STORE]
    query = parse_query(request, SessionsQuery)
    cursor = _decode_cursor(query.cursor)
    if cursor is None:
        as_of, after = await store.last_seq(), None
    else:
        try:
            as_of, after = int(cursor[0]), (int(cursor[1]), str(cursor[2]))
        except (IndexError, TypeError, ValueError, OverflowError):
            raise _bad_cursor() from None
        if not (0 <= as_of <= MAX_ID and 0 <= after[0] <= MAX_ID):
            raise _bad_cursor()
    readiness = None if query.readiness is None else query.readiness.value
    turn_status = None if query.turn_status is None else query.turn_status.value
    limit = query.limit
    rows = await store.list_sessions(SessionPageQuery(as_of, after, limit, readiness, turn_status))
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
    query = parse_query(request, SessionQuery)
    if not query.wait:
        row = await store.get_session(session_id)
        if row is None:
            raise _not_found(session_id)
        return web.Response(body=row.snapshot, content_type="application/json")
    deadline = time.monotonic() + query.timeout
    with request.app[HUB].watch_session(session_id) as watch:
        row = await store.get_session(session_id)
        if row is None:
            raise _not_found(session_id)
        while row.version <= query.version:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await watch.wait(remaining):
                break
            row = await store.get_session(session_id) or row
    return web.Response(body=row.snapshot, content_type="application/json")


async def list_turns(request: web.Request) -> web.Response:
    """`GET /v1/sessions/{id}/turns`: turns in the order they were first seen."""
    store, session_id = request.app[STORE], request.match_info["session_id"]
    query = parse_query(request, PageQuery)
    after = _int_cursor(_decode_cursor(query.cursor))
    if await store.get_session(session_id) is None:
        raise _not_found(session_id)
    rows = await store.list_turns(session_id, after, query.limit)
    next_cursor = _encode_cursor(rows[-1][0]) if len(rows) == query.limit else None
    items = [orjson.Fragment(snapshot) for _, snapshot in rows]
    return json_response({"items": items, "next_cursor": next_cursor})


async def list_session_events(request: web.Request) -> web.Response:
    """`GET /v1/sessions/{id}/events`: the session's raw events, oldest first."""
    store, session_id = request.app[STORE], request.match_info["session_id"]
    query = parse_query(request, PageQuery)
    after = _int_cursor(_decode_cursor(query.cursor))
    if await store.get_session(session_id) is None:
        raise _not_found(session_id)
    events = await store.list_session_events(session_id, after, query.limit)
    next_cursor = _encode_cursor(events[-1].seq) if len(events) == query.limit else None
    return json_response({"items": [_event_item(e) for e in events], "next_cursor": next_cursor})


def _int_cursor(cursor: list[Any] | None) -> int:
    if cursor is None:
        return 0
    value = cursor[0]
    if len(cursor) != 1 or type(value) is not int or not 0 <= value <= MAX_ID:
        raise _bad_cursor()
    return value


async def list_changes(request: web.Request) -> web.Response:
    """`GET /v1/changes?after=&limit=&type=`: the change log, oldest first."""
    query = parse_query(request, ChangesQuery)
    exclude = excluded_types(query.type)
    changes = await request.app[STORE].list_changes(query.after, query.limit, query.type, exclude)
    next_after = changes[-1].id if len(changes) == query.limit else None
    items = [orjson.Fragment(change.body) for change in changes]
    return json_response({"items": items, "next_after": next_after})


# -- declarations ----------------------------------------------------------------------------

_SESSION_404 = {404: ("NOT_FOUND",)}


def routes() -> list[Route]:
    """The read API's routes (scope `agent:read`)."""

    def read(
        path: str,
        handler: Handler,
        summary: str,
        query: type[BaseModel],
        model: type[BaseModel],
        description: str = "",
    ) -> Route:
        return Route(
            "GET",
            path,
            handler,
            summary,
            tag="read",
            scope=auth.READ,
            query=query,
            replies={200: Reply("OK", model)},
            errors=_SESSION_404 if "{session_id}" in path else {},
            description=description,
        )

    return [
        read(
            "/v1/events",
            list_events,
            "The raw event log, oldest first",
            EventLogQuery,
            EventLogPage,
        ),
        read("/v1/changes", list_changes, "The change log, oldest first", ChangesQuery, ChangePage),
        read(
            "/v1/sessions",
            list_sessions,
            "Sessions, newest activity first",
            SessionsQuery,
            SessionPage,
        ),
        read(
            "/v1/sessions/{session_id}",
            get_session,
            "One session's state, optionally long-polling for a newer version",
            SessionQuery,
            SessionState,
            description="With `wait=true` the request is held until the session's version "
            "exceeds `version` or `timeout` seconds pass, then the current state is answered.",
        ),
        read(
            "/v1/sessions/{session_id}/turns", list_turns, "A session's turns", PageQuery, TurnPage
        ),
        read(
            "/v1/sessions/{session_id}/events",
            list_session_events,
            "A session's raw events, oldest first",
            PageQuery,
            SessionEventPage,
        ),
    ]
