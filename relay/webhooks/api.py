"""The webhook API (scope `agent:write`) and the dispatcher's lifetime in the app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from relay import auth
from relay.appkeys import DELIVERY_STORE, DISPATCHER, METRICS, SECRET_BOX, SETTINGS, STORE
from relay.errors import ApiError, json_response
from relay.read_api import MAX_ID, MAX_LIMIT, int_param
from relay.store.sqlite import sqlite_path
from relay.timefmt import parse_time
from relay.webhooks.dispatcher import Dispatcher
from relay.webhooks.model import DeliveryStatus, Subscription
from relay.webhooks.secrets import SecretBox
from relay.webhooks.store import DeliveryNotRetryable, open_delivery_store
from relay.webhooks.subscriptions import (
    NewSubscription,
    SubscriptionFields,
    create_subscription,
    delivery_view,
    rotate_secret,
    subscription_view,
    updates,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Model = TypeVar("Model", bound=BaseModel)


def setup_webhooks(
    app: web.Application,
    scoped: Callable[[str, Handler], Handler],
    clock: Callable[[], float] = time.time,
) -> None:
    """Add the webhook routes, and the delivery store and dispatcher to the app's lifetime
    (after the main store, which applies the schema)."""
    settings = app[SETTINGS]
    app[DELIVERY_STORE] = open_delivery_store(settings.store)
    app.cleanup_ctx.append(_dispatcher_lifetime(clock))
    routes: list[tuple[str, str, Handler]] = [
        ("POST", "/v1/subscriptions", _create),
        ("GET", "/v1/subscriptions", _list),
        ("GET", "/v1/subscriptions/{id}", _get),
        ("PATCH", "/v1/subscriptions/{id}", _patch),
        ("DELETE", "/v1/subscriptions/{id}", _delete),
        ("POST", "/v1/subscriptions/{id}/rotate-secret", _rotate),
        ("POST", "/v1/subscriptions/{id}/test", _test),
        ("POST", "/v1/subscriptions/{id}/enable", _enable),
        ("POST", "/v1/subscriptions/{id}/recover", _recover),
        ("GET", "/v1/subscriptions/{id}/deliveries", _deliveries),
        ("GET", "/v1/deliveries/{id}", _delivery),
        ("POST", "/v1/deliveries/{id}/retry", _retry),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, scoped(auth.WRITE, _with_clock(handler, clock)))


_NOW = web.RequestKey("webhooks_now", float)


def _with_clock(handler: Handler, clock: Callable[[], float]) -> Handler:
    async def timed(request: web.Request) -> web.StreamResponse:
        request[_NOW] = clock()
        return await handler(request)

    return timed


def _dispatcher_lifetime(
    clock: Callable[[], float],
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        store = app[DELIVERY_STORE]
        data_dir = sqlite_path(settings.store.url).parent
        app[SECRET_BOX] = SecretBox.from_config(settings.delivery.encryption_key, data_dir)
        await store.open()
        dispatcher = Dispatcher(
            store, app[SECRET_BOX], settings.delivery, app[METRICS].deliveries, clock
        )
        app[DISPATCHER] = dispatcher
        # Commits only wake the enqueuer, which reads the durable change log.
        app[STORE].add_commit_listener(lambda commit: dispatcher.changes_committed())
        await dispatcher.start()
        yield
        await dispatcher.stop()
        await store.close()

    return lifetime


# -- helpers ---------------------------------------------------------------------------------


async def _body(request: web.Request, model: type[Model]) -> Model:
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise ApiError(400, "INVALID_JSON", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "INVALID_JSON", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, "INVALID_REQUEST", f"{where}: {first['msg']}") from None


async def _subscription(request: web.Request) -> Subscription:
    subscription_id = request.match_info["id"]
    found = await request.app[DELIVERY_STORE].get_subscription(subscription_id)
    if found is None:
        raise ApiError(404, "NOT_FOUND", f"no subscription {subscription_id!r}")
    return found


def _delivery_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 < value <= MAX_ID:
        raise ApiError(404, "NOT_FOUND", f"no delivery {raw!r}")
    return value


def _now(request: web.Request) -> float:
    return request[_NOW]


# -- handlers --------------------------------------------------------------------------------


async def _create(request: web.Request) -> web.Response:
    fields = await _body(request, NewSubscription)
    now = _now(request)
    app = request.app
    subscription, secret = await create_subscription(
        app[DELIVERY_STORE], app[SECRET_BOX], fields, now
    )
    await app[DISPATCHER].refresh()
    return json_response({**subscription_view(subscription, now), "secret": secret}, 201)


async def _list(request: web.Request) -> web.Response:
    subscriptions = await request.app[DELIVERY_STORE].list_subscriptions()
    now = _now(request)
    return json_response({"items": [subscription_view(s, now) for s in subscriptions]})


async def _get(request: web.Request) -> web.Response:
    return json_response(subscription_view(await _subscription(request), _now(request)))


async def _patch(request: web.Request) -> web.Response:
    fields = await _body(request, SubscriptionFields)
    subscription = await _subscription(request)
    now = _now(request)
    updated = await request.app[DELIVERY_STORE].update_subscription(
        subscription.id, updates(fields, now)
    )
    if updated is None:
        raise ApiError(404, "NOT_FOUND", f"no subscription {subscription.id!r}")
    await request.app[DISPATCHER].refresh()
    return json_response(subscription_view(updated, now))


async def _delete(request: web.Request) -> web.Response:
    subscription = await _subscription(request)
    await request.app[DELIVERY_STORE].delete_subscription(subscription.id)
    await request.app[DISPATCHER].refresh()
    return web.Response(status=204)


async def _rotate(request: web.Request) -> web.Response:
    subscription = await _subscription(request)
    now = _now(request)
    app = request.app
    overlap = app[SETTINGS].delivery.rotation_overlap_seconds
    rotated = await rotate_secret(app[DELIVERY_STORE], app[SECRET_BOX], subscription, now, overlap)
    if rotated is None:
        raise ApiError(404, "NOT_FOUND", f"no subscription {subscription.id!r}")
    await app[DISPATCHER].refresh()
    return json_response({**subscription_view(rotated[0], now), "secret": rotated[1]})


async def _test(request: web.Request) -> web.Response:
    subscription = await _subscription(request)
    body = orjson.dumps({"subscription_id": subscription.id, "message": "a test event from relay"})
    delivery = await request.app[DELIVERY_STORE].add_test_delivery(
        subscription.id, body, _now(request)
    )
    if delivery is None:
        raise ApiError(404, "NOT_FOUND", f"no subscription {subscription.id!r}")
    await request.app[DISPATCHER].refresh()
    return json_response(delivery_view(delivery, []), 202)


async def _enable(request: web.Request) -> web.Response:
    subscription = await _subscription(request)
    now = _now(request)
    enabled = await request.app[DELIVERY_STORE].update_subscription(
        subscription.id, updates(SubscriptionFields(enabled=True), now)
    )
    if enabled is None:
        raise ApiError(404, "NOT_FOUND", f"no subscription {subscription.id!r}")
    await request.app[DISPATCHER].refresh()
    return json_response(subscription_view(enabled, now))


class _Recover(BaseModel):
    since: str

    def moment(self) -> str:
        try:
            parse_time(self.since)
        except ValueError:
            raise ApiError(
                400, "INVALID_REQUEST", "since: must be an RFC 3339 time with a UTC offset"
            ) from None
        return self.since


async def _recover(request: web.Request) -> web.Response:
    since = (await _body(request, _Recover)).moment()
    subscription = await _subscription(request)
    try:
        queued = await request.app[DELIVERY_STORE].recover(subscription.id, since, _now(request))
    except KeyError:
        raise ApiError(404, "NOT_FOUND", f"no subscription {subscription.id!r}") from None
    await request.app[DISPATCHER].refresh()
    return json_response({"queued": queued}, 202)


async def _deliveries(request: web.Request) -> web.Response:
    subscription = await _subscription(request)
    raw_status = request.query.get("status")
    try:
        status = DeliveryStatus(raw_status) if raw_status else None
    except ValueError:
        allowed = ", ".join(s.value for s in DeliveryStatus)
        raise ApiError(400, "INVALID_PARAMETER", f"status must be one of {allowed}") from None
    after = int_param(request, "after", 0, 0, MAX_ID)
    limit = int_param(request, "limit", 100, 1, MAX_LIMIT)
    store = request.app[DELIVERY_STORE]
    found = await store.list_deliveries(subscription.id, status, after, limit)
    attempts = await store.list_attempts([d.id for d in found])
    next_after = found[-1].id if len(found) == limit else None
    items = [delivery_view(d, attempts[d.id]) for d in found]
    return json_response({"items": items, "next_after": next_after})


async def _delivery(request: web.Request) -> web.Response:
    delivery_id = _delivery_id(request)
    store = request.app[DELIVERY_STORE]
    delivery = await store.get_delivery(delivery_id)
    if delivery is None:
        raise ApiError(404, "NOT_FOUND", f"no delivery {delivery_id}")
    attempts = await store.list_attempts([delivery_id])
    return json_response(delivery_view(delivery, attempts[delivery_id]))


async def _retry(request: web.Request) -> web.Response:
    delivery_id = _delivery_id(request)
    store = request.app[DELIVERY_STORE]
    try:
        delivery = await store.retry_delivery(delivery_id, _now(request))
    except DeliveryNotRetryable as exc:
        raise ApiError(409, "CONFLICT", str(exc)) from None
    if delivery is None:
        raise ApiError(404, "NOT_FOUND", f"no delivery {delivery_id}")
    await request.app[DISPATCHER].refresh()
    attempts = await store.list_attempts([delivery_id])
    return json_response(delivery_view(delivery, attempts[delivery_id]), 202)
