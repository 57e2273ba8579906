"""The webhook API (scope `agent:write`) and the dispatcher's lifetime in the app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel

from relay import auth
from relay.api_models import MAX_ID
from relay.appkeys import DELIVERY_STORE, DISPATCHER, HUB, METRICS, SECRET_BOX, SETTINGS
from relay.errors import ApiError, json_response
from relay.routes import Handler, Reply, Route, parse_body, parse_query
from relay.store import data_directory
from relay.webhooks.api_models import (
    DeliveriesQuery,
    DeliveryPage,
    DeliveryView,
    Recovery,
    Requeued,
    SubscriptionList,
    SubscriptionsQuery,
    SubscriptionView,
    SubscriptionWithSecret,
)
from relay.webhooks.dispatcher import Dispatcher
from relay.webhooks.model import Subscription
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

_NOW = web.RequestKey("webhooks_now", float)


def setup_webhooks(app: web.Application, clock: Callable[[], float] = time.time) -> None:
    """Add the delivery store and the dispatcher to the app's lifetime (after the main
    store, which applies the schema); the routes are `routes(clock)`."""
    app[DELIVERY_STORE] = open_delivery_store(app[SETTINGS].store)
    app.cleanup_ctx.append(_dispatcher_lifetime(clock))


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
        data_dir = data_directory(settings.store.url)
        app[SECRET_BOX] = SecretBox.from_config(settings.delivery.encryption_key, data_dir)
        await store.open()
        dispatcher = Dispatcher(
            store, app[SECRET_BOX], settings.delivery, app[METRICS].deliveries, clock
        )
        app[DISPATCHER] = dispatcher
        # Commits (on any instance, through the hub) only wake the enqueuer, which reads
        # the durable change log.
        app[HUB].add_commit_listener(lambda commit: dispatcher.changes_committed())
        await dispatcher.start()
        yield
        await dispatcher.stop()
        await store.close()

    return lifetime


# -- helpers ---------------------------------------------------------------------------------


async def _subscription(request: web.Request) -> Subscription:
    subscription_id = request.match_info["id"]
    found = await request.app[DELIVERY_STORE].get_subscription(subscription_id)
    if found is None:
        raise ApiError(404, "NOT_FOUND", f"no subscription {subscription_id!r}")
    return found


def _delivery_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 19 else 0
    if not 0 < value <= MAX_ID:
        raise ApiError(404, "NOT_FOUND", f"no delivery {raw!r}")
    return value


def _now(request: web.Request) -> float:
    return request[_NOW]


async def _views(
    request: web.Request, subscriptions: list[Subscription], now: float
) -> list[dict[str, Any]]:
    """The subscriptions as the API shows them, each with its queue depth."""
    depths = await request.app[DELIVERY_STORE].queue_depths([s.id for s in subscriptions])
    return [subscription_view(s, now, depths.get(s.id, 0)) for s in subscriptions]


# -- handlers --------------------------------------------------------------------------------


async def _create(request: web.Request) -> web.Response:
    fields = await parse_body(request, NewSubscription)
    now = _now(request)
    app = request.app
    subscription, secret = await create_subscription(
        app[DELIVERY_STORE], app[SECRET_BOX], fields, now
    )
    await app[DISPATCHER].refresh()
    view = (await _views(request, [subscription], now))[0]
    return json_response({**view, "secret": secret}, 201)


async def _list(request: web.Request) -> web.Response:
    query = parse_query(request, SubscriptionsQuery)
    store = request.app[DELIVERY_STORE]
    found, next_after = await store.page_subscriptions(query.after, query.limit)
    now = _now(request)
    items = await _views(request, found, now)
    return json_response({"items": items, "next_after": next_after})


async def _get(request: web.Request) -> web.Response:
    subscription = await _subscription(request)
    return json_response((await _views(request, [subscription], _now(request)))[0])


async def _patch(request: web.Request) -> web.Response:
    fields = await parse_body(request, SubscriptionFields)
    subscription = await _subscription(request)
    now = _now(request)
    try:
        changed = updates(fields, now, subscription, request.app[SECRET_BOX])
    except ValueError as exc:
        raise ApiError(400, "INVALID_REQUEST", str(exc)) from None
    updated = await request.app[DELIVERY_STORE].update_subscription(subscription.id, changed)
    if updated is None:
        raise ApiError(404, "NOT_FOUND", f"no subscription {subscription.id!r}")
    await request.app[DISPATCHER].refresh()
    return json_response((await _views(request, [updated], now))[0])


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
    view = (await _views(request, [rotated[0]], now))[0]
    return json_response({**view, "secret": rotated[1]})


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
        subscription.id,
        updates(SubscriptionFields(enabled=True), now, subscription, request.app[SECRET_BOX]),
    )
    if enabled is None:
        raise ApiError(404, "NOT_FOUND", f"no subscription {subscription.id!r}")
    await request.app[DISPATCHER].refresh()
    return json_response((await _views(request, [enabled], now))[0])


async def _recover(request: web.Request) -> web.Response:
    since = (await parse_body(request, Recovery)).since
    subscription = await _subscription(request)
    try:
        queued = await request.app[DELIVERY_STORE].recover(subscription.id, since, _now(request))
    except KeyError:
        raise ApiError(404, "NOT_FOUND", f"no subscription {subscription.id!r}") from None
    await request.app[DISPATCHER].refresh()
    return json_response({"queued": queued}, 202)


async def _deliveries(request: web.Request) -> web.Response:
    subscription = await _subscription(request)
    query = parse_query(request, DeliveriesQuery)
    after, limit = query.after, query.limit
    store = request.app[DELIVERY_STORE]
    found = await store.list_deliveries(subscription.id, query.status, after, limit)
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


# -- declarations ----------------------------------------------------------------------------

_BAD_BODY = ("INVALID_JSON", "INVALID_REQUEST")
_NO_SUBSCRIPTION = {404: ("NOT_FOUND",)}
_BODY_ERRORS = {400: _BAD_BODY, 404: ("NOT_FOUND",), 413: ("PAYLOAD_TOO_LARGE",)}


def routes(clock: Callable[[], float] = time.time) -> list[Route]:
    """The subscription and delivery routes (scope `agent:write`)."""

    def manage(
        method: str,
        path: str,
        handler: Handler,
        summary: str,
        replies: Mapping[int, Reply],
        errors: Mapping[int, tuple[str, ...]] = _NO_SUBSCRIPTION,
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        description: str = "",
    ) -> Route:
        return Route(
            method,
            path,
            _with_clock(handler, clock),
            summary,
            tag="webhooks",
            scope=auth.WRITE,
            replies=replies,
            query=query,
            body=body,
            errors=errors,
            description=description,
        )

    subscription = {200: Reply("The subscription.", SubscriptionView)}
    with_secret = Reply("The subscription with its new secret, shown once.", SubscriptionWithSecret)
    delivery = Reply("The delivery, queued to be attempted now.", DeliveryView)
    return [
        manage(
            "POST",
            "/v1/subscriptions",
            _create,
            "Create a subscription",
            {201: with_secret},
            {400: _BAD_BODY, 413: ("PAYLOAD_TOO_LARGE",)},
            body=NewSubscription,
            description="It receives the changes committed after it is created.",
        ),
        manage(
            "GET",
            "/v1/subscriptions",
            _list,
            "The subscriptions, a page at a time",
            {200: Reply("The subscriptions, oldest first.", SubscriptionList)},
            {},
            query=SubscriptionsQuery,
        ),
        manage("GET", "/v1/subscriptions/{id}", _get, "One subscription", subscription),
        manage(
            "PATCH",
            "/v1/subscriptions/{id}",
            _patch,
            "Change a subscription",
            subscription,
            _BODY_ERRORS,
            body=SubscriptionFields,
            description="Absent or null fields keep their value; `enabled: false` pauses it.",
        ),
        manage(
            "DELETE",
            "/v1/subscriptions/{id}",
            _delete,
            "Remove a subscription with its deliveries",
            {204: Reply("Removed.", content_types=())},
        ),
        manage(
            "POST",
            "/v1/subscriptions/{id}/rotate-secret",
            _rotate,
            "Give a subscription a new secret",
            {200: with_secret},
            description="The old secret keeps signing alongside the new one for "
            "`delivery.rotation_overlap_seconds` (24 h).",
        ),
        manage(
            "POST",
            "/v1/subscriptions/{id}/test",
            _test,
            "Send a test event",
            {202: Reply("The test delivery, queued.", DeliveryView)},
        ),
        manage(
            "POST",
            "/v1/subscriptions/{id}/enable",
            _enable,
            "Enable a subscription again",
            subscription,
        ),
        manage(
            "POST",
            "/v1/subscriptions/{id}/recover",
            _recover,
            "Queue again what a subscription missed since a moment",
            {202: Reply("Queued.", Requeued)},
            _BODY_ERRORS,
            body=Recovery,
            description="Failed deliveries and changes it has no delivery for, since `since`.",
        ),
        manage(
            "GET",
            "/v1/subscriptions/{id}/deliveries",
            _deliveries,
            "A subscription's deliveries, oldest first, with their attempts",
            {200: Reply("A page of deliveries.", DeliveryPage)},
            query=DeliveriesQuery,
        ),
        manage(
            "GET",
            "/v1/deliveries/{id}",
            _delivery,
            "One delivery with its attempts",
            {200: Reply("The delivery.", DeliveryView)},
        ),
        manage(
            "POST",
            "/v1/deliveries/{id}/retry",
            _retry,
            "Attempt a delivery again now",
            {202: delivery},
            {404: ("NOT_FOUND",), 409: ("CONFLICT",)},
            description="With a fresh retry schedule; 409 while it is being attempted.",
        ),
    ]
