"""Every HTTP route declared once: registered on the app and described by `/openapi.json`.

A `Route` says what a client needs to know (method, path, scope, parameters, answers,
error codes) next to the handler that serves it. `add_routes` puts it on the router
behind its scope check; `relay.openapi` builds the document from the same declarations.
Adding a route is one declaration, passed to `add_routes` in `create_app`:

    Route(
        "POST", "/v1/subscriptions", create_subscription, "Create a subscription",
        tag="webhooks", scope=auth.WRITE, body=NewSubscription,
        replies={201: Reply("Created; the secret is shown once.", SubscriptionWithSecret)},
        errors={400: ("INVALID_JSON", "INVALID_REQUEST")},
    )

Scoped routes get 401 `UNAUTHORIZED` and 403 `FORBIDDEN`, routes with a query or header
model 400 `INVALID_PARAMETER`, without saying so; every other error status and code
the handler can answer goes in `errors`, or the schemathesis test fails.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar, get_origin

import orjson
from aiohttp import web
from multidict import MultiMapping
from pydantic import BaseModel, ValidationError

from relay import auth
from relay.appkeys import SETTINGS, STORE
from relay.changes import split_list
from relay.errors import ApiError, field_problem

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Params = TypeVar("Params", bound=BaseModel)
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer a route gives: a JSON body described by `model`, or other media types."""

    description: str
    model: type[BaseModel] | None = None
    content_types: tuple[str, ...] = (JSON,)  # () for an answer without a body
    headers: Mapping[str, str] = field(default_factory=dict)  # name -> description


@dataclass(frozen=True, slots=True)
class Route:
    """One operation. Scoped routes answer 401/403, routes with parameters 400."""

    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    replies: Mapping[int, Reply]
    scope: str | None = None  # the API key scope required; None: no key
    query: type[BaseModel] | None = None
    headers: type[BaseModel] | None = None
    body: type[BaseModel] | None = None  # a JSON request body
    errors: Mapping[int, tuple[str, ...]] = field(default_factory=dict)  # status -> codes
    description: str = ""
    head: bool = True  # GET routes also answer HEAD (not streams: their body never ends)
    query_token: bool = False  # the key may come as ?access_token= (event streams only)

    def error_codes(self) -> dict[int, tuple[str, ...]]:
        """Every error status the route can answer, with the codes it uses for each."""
        codes: dict[int, list[str]] = {}
        if self.query is not None or self.headers is not None:
            codes.setdefault(400, []).append("INVALID_PARAMETER")
        if self.scope is not None:
            codes.setdefault(401, []).append("UNAUTHORIZED")
            codes.setdefault(403, []).append("FORBIDDEN")
        for status, declared in self.errors.items():
            codes.setdefault(status, []).extend(c for c in declared if c not in codes[status])
        return {status: tuple(codes[status]) for status in sorted(codes)}


ROUTES = web.AppKey("routes", list[Route])


def add_routes(app: web.Application, routes: Iterable[Route]) -> None:
    """Register `routes` on the app's router, each behind its scope check."""
    declared = app.setdefault(ROUTES, [])
    for route in routes:
        handler = route.handler
        if route.scope is not None:
            handler = scoped(route.scope, route.handler, route.query_token)
        if route.method == "GET" and route.head:
            app.router.add_get(route.path, handler)
        else:
            app.router.add_route(route.method, route.path, handler)
        declared.append(route)


def scoped(scope: str, handler: Handler, query_token: bool = False) -> Handler:
    """Require an API key with `scope` (unless auth is disabled) before `handler` runs;
    with `query_token`, also as `?access_token=`."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        app = request.app
        if app[SETTINGS].auth.enabled:
            await auth.authorize(app[STORE], request, scope, query_token)
        return await handler(request)

    return guarded


def parse_query(request: web.Request, model: type[Params]) -> Params:
    """The request's query string as `model`; invalid values are 400 INVALID_PARAMETER."""
    return _parse(request.query, model)


def parse_headers(request: web.Request, model: type[Params]) -> Params:
    """The request's headers (by field alias) as `model`; invalid ones are 400."""
    return _parse(request.headers, model)


async def parse_body(request: web.Request, model: type[Params]) -> Params:
    """The request's JSON object body (empty: `{}`) as `model`: 400 INVALID_JSON if it is
    not a JSON object, 400 INVALID_REQUEST if the model refuses it."""
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise ApiError(400, "INVALID_JSON", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "INVALID_JSON", "the body must be a JSON object")
    return _validated(model, data, "INVALID_REQUEST", "body")


def _parse(source: MultiMapping[str], model: type[Params]) -> Params:
    data: dict[str, object] = {}
    for name, info in model.model_fields.items():
        key = info.alias or name
        # An empty value (`?readiness=`, an empty form field) counts as absent.
        values = [value for value in source.getall(key, []) if value]
        if not values:
            continue
        if get_origin(info.annotation) is tuple:
            # Lists may repeat the parameter and may hold comma-separated values.
            data[key] = split_list(values)
        else:
            data[key] = values[0]
    return _validated(model, data, "INVALID_PARAMETER", "parameters")


def _validated(model: type[Params], data: dict[str, object], code: str, whole: str) -> Params:
    """`data` as `model`, or 400 `code` naming the first field it refuses."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problem = field_problem(exc.errors(include_url=False)[0], whole)
        raise ApiError(400, code, problem) from None
