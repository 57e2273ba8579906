"""The aiohttp application factory: routes, the error envelope and the store's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay import auth
from relay.api_models import Health, Readyz
from relay.appkeys import HUB, METRICS, SETTINGS, STORE, STREAM_KEYS
from relay.config import Settings
from relay.connectors.setup import setup_connectors
from relay.dashboard import routes as dashboard_routes
from relay.errors import ApiError, error_response, json_response
from relay.hub import Hub, open_hub
from relay.ingest import IngestContext, Source
from relay.ingest import route as ingest_route
from relay.logs import request_line_writer
from relay.metrics import Metrics
from relay.openapi import openapi_handler
from relay.pipeline import STORE_UNAVAILABLE_MESSAGE
from relay.read_api import routes as read_routes
from relay.routes import Handler, Reply, Route, add_routes
from relay.sse import revocation_watch
from relay.sse import routes as stream_routes
from relay.store import Store, StoreUnavailable, open_store
from relay.stream_keys import StreamKeys
from relay.webhooks.api import routes as webhook_routes
from relay.webhooks.api import setup_webhooks

log = structlog.get_logger("relay.http")
REQUEST_ID = web.RequestKey("request_id", str)
# A client's X-Request-Id is echoed in a header and a log line only if it is plain text.
_CLIENT_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")

_STATUS_CODES = {
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
}


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    hub: Hub | None = None,
    clock: Callable[[], float] = time.time,
    on_bootstrap_key: Callable[[auth.NewKey], None] | None = None,
) -> web.Application:
    """Build the relay; the store is opened on start-up and closed on clean-up."""
    app = web.Application(
        middlewares=[_envelope_middleware(settings.log.requests)],
        client_max_size=settings.server.max_body_bytes,
    )
    app[SETTINGS] = settings
    if store is None:
        store = open_store(
            settings.store, source_providers(settings), settings.alerts, settings.retention
        )
    app[STORE] = store
    if hub is None:
        hub = open_hub(settings.hub, store.list_changes, store.last_change_id)
    app[HUB] = hub
    app[METRICS] = Metrics()
    app[STREAM_KEYS] = StreamKeys()
    store.add_commit_listener(app[HUB].publish)
    store.add_commit_listener(app[METRICS].observe_commit)
    app[METRICS].sse_subscribers.set_function(lambda: app[HUB].subscribers)
    app[METRICS].watch_hub(hub.counters)
    app.cleanup_ctx.append(_store_lifetime(on_bootstrap_key))
    app.cleanup_ctx.append(_hub_lifetime)
    app.cleanup_ctx.append(_alert_loop(clock))
    app.cleanup_ctx.append(revocation_watch)
    setup_webhooks(app, clock)

    sources = {s.id: Source.from_settings(s) for s in settings.sources}
    connector_routes = setup_connectors(app, sources, clock)
    ingest_ctx = IngestContext(sources, app[STORE], app[METRICS], settings.server.max_body_bytes)
    add_routes(
        app,
        [
            ingest_route(ingest_ctx, clock),
            *read_routes(),
            *stream_routes(),
            *webhook_routes(clock),
            *_operations_routes(),
            *dashboard_routes(),
            *connector_routes,
        ],
    )
    app.on_shutdown.append(_close_streams)
    app.on_response_prepare.append(_add_request_id)
    return app


def _store_lifetime(
    on_bootstrap_key: Callable[[auth.NewKey], None] | None,
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        store = app[STORE]
        await store.open()
        if app[SETTINGS].auth.enabled:
            new_key = await auth.bootstrap_key(store)
            if new_key is not None:
                log.info("auth.bootstrap_key_created", key_id=new_key.key.id)
                if on_bootstrap_key is not None:
                    on_bootstrap_key(new_key)
        yield
        await store.close()

    return lifetime


async def _hub_lifetime(app: web.Application) -> AsyncIterator[None]:
    """The hub runs while the store is open (it starts at the log's last change)."""
    await app[HUB].start()
    yield
    await app[HUB].stop()


def source_providers(settings: Settings) -> dict[str, str]:
    """Source id -> provider, for the store to read stored events back."""
    return {source.id: source.provider for source in settings.sources}


def _alert_loop(
    clock: Callable[[], float],
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        interval = app[SETTINGS].alerts.check_interval_seconds

        async def run() -> None:
            while True:
                await asyncio.sleep(interval)
                try:
                    await app[STORE].fire_due_alerts(clock())
                except Exception:
                    log.exception("alerts.check_failed")

        task = asyncio.create_task(run(), name="relay-alerts")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return lifetime


def _envelope_middleware(log_requests: bool) -> Callable[..., Awaitable[web.StreamResponse]]:
    # Request ids: a random per-process prefix and a counter (unique, and cheap to make).
    prefix = secrets.token_hex(4)
    counter = itertools.count(1)
    write_line = request_line_writer()

    @web.middleware
    async def envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get("X-Request-Id", "")
        if not _CLIENT_REQUEST_ID.fullmatch(request_id):
            request_id = f"{prefix}-{next(counter):x}"
        request[REQUEST_ID] = request_id
        try:
            response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _STATUS_CODES.get(exc.status, "HTTP_ERROR")
            allow = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            response = error_response(exc.status, code, exc.reason, allow)
        except Exception:
            log.exception("request.failed", request_id=request_id, path=request.path)
            response = error_response(500, "INTERNAL", "an internal error occurred")
        if log_requests:
            write_line(
                request_id=request_id,
                method=request.method,
                path=request.path,
                status=response.status,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
        return response

    return envelope


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, streams included, carries the id its log line has (a tapped
    upstream's own X-Request-Id is passed on as it came)."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers.setdefault("X-Request-Id", request_id)


async def _close_streams(app: web.Application) -> None:
    """On shutdown, end every SSE stream cleanly (clients resume with Last-Event-ID)."""
    app[HUB].close()


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE].check_writable()
    except StoreUnavailable:
        return error_response(
            503, "STORE_UNAVAILABLE", STORE_UNAVAILABLE_MESSAGE, {"Retry-After": "5"}
        )
    return json_response({"status": "ready"})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _operations_routes() -> list[Route]:
    return [
        Route(
            "GET",
            "/healthz",
            _healthz,
            "Liveness: the process answers",
            tag="operations",
            replies={200: Reply("Alive.", Health)},
        ),
        Route(
            "GET",
            "/readyz",
            _readyz,
            "Readiness: the store can take a write",
            tag="operations",
            replies={200: Reply("Ready.", Readyz)},
            errors={503: ("STORE_UNAVAILABLE",)},
        ),
        Route(
            "GET",
            "/metrics",
            _metrics,
            "Prometheus metrics",
            tag="operations",
            replies={200: Reply("Prometheus text format.", content_types=("text/plain",))},
        ),
        Route(
            "GET",
            "/openapi.json",
            openapi_handler(),
            "This document",
            tag="operations",
            replies={200: Reply("An OpenAPI 3.1 document.")},
        ),
    ]
