"""`POST /v1/sources/{id}/follows` starts a follow; `GET` lists them with their position."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from relay import auth
from relay.connectors.follow import Follower
from relay.errors import ApiError, json_response
from relay.routes import Reply, Route, parse_body
from relay.store import Follow, Store
from relay.timefmt import format_time, utcnow


class NewFollow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: str = Field(min_length=1, max_length=256)


class FollowItem(BaseModel):
    source: str
    session_id: str
    position: str | None = Field(description="The last SSE id stored (Last-Event-ID).")
    state: str = Field(description="following, backoff, idle or deleted.")
    attempts: int = Field(description="Failed attempts in a row.")
    reconnects: int
    last_error: str | None
    created_at: str
    updated_at: str
    owner: str | None = Field(description="The instance running it.")


class FollowList(BaseModel):
    items: list[FollowItem]


def item(follow: Follow) -> dict[str, object]:
    return {
        "source": follow.source,
        "session_id": follow.session_id,
        "position": follow.position,
        "state": follow.state,
        "attempts": follow.attempts,
        "reconnects": follow.reconnects,
        "last_error": follow.last_error,
        "created_at": follow.created_at,
        "updated_at": follow.updated_at,
        "owner": follow.owner,
    }


def routes(store: Store, follower: Follower | None, followed: Mapping[str, object]) -> list[Route]:
    def known(request: web.Request) -> str:
        source = request.match_info["source_id"]
        if source not in followed:
            raise ApiError(404, "UNKNOWN_SOURCE", f"no source with id {source!r} has a follow_url")
        return source

    async def start(request: web.Request) -> web.Response:
        source = known(request)
        body = await parse_body(request, NewFollow)
        follow = await store.start_follow(source, body.session_id, format_time(utcnow()))
        if follower is not None:
            follower.wake()
        return json_response(item(follow), status=202)

    async def listing(request: web.Request) -> web.Response:
        source = known(request)
        return json_response({"items": [item(f) for f in await store.list_follows(source)]})

    path = "/v1/sources/{source_id}/follows"
    return [
        Route(
            "POST",
            path,
            start,
            "Follow a session's stream",
            tag="connectors",
            scope=auth.WRITE,
            body=NewFollow,
            replies={202: Reply("Following (or following again from its position).", FollowItem)},
            errors={400: ("INVALID_JSON", "INVALID_REQUEST"), 404: ("UNKNOWN_SOURCE",)},
        ),
        Route(
            "GET",
            path,
            listing,
            "A source's follows, with their position and state",
            tag="connectors",
            scope=auth.READ,
            replies={200: Reply("The follows, oldest first.", FollowList)},
            errors={404: ("UNKNOWN_SOURCE",)},
        ),
    ]
