"""`POST /v1/ingest/{source_id}`: verify, parse, normalise, store, then answer."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog
from aiohttp import web

from relay.api_models import IngestAnswer, ProviderEvent
from relay.config import SourceSettings
from relay.errors import ApiError
from relay.logs import RepeatedWarnings
from relay.metrics import Metrics
from relay.normalize import NORMALISERS, InvalidEvent, Normaliser
from relay.routes import Reply, Route
from relay.store import IngestRecord, Store, StoreUnavailable
from relay.verify import VerificationError, Verifier, verify_signature

log = structlog.get_logger("relay.ingest")

UNKNOWN_SOURCE_LABEL = "(unknown)"
# Deeper JSON could not be encoded again (orjson stops at 255 levels): refused up front.
MAX_NESTING = 200
STORE_UNAVAILABLE_MESSAGE = "the store cannot take writes right now; retry later"
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Source:
    """A configured source, ready to verify and normalise its requests."""

    id: str
    verifier: Verifier
    normalise: Normaliser

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> Source:
        return cls(settings.id, Verifier.from_settings(settings), NORMALISERS[settings.provider])


@dataclass(frozen=True, slots=True)
class IngestContext:
    sources: Mapping[str, Source]
    store: Store
    metrics: Metrics
    max_body_bytes: int
    repeated_warnings: RepeatedWarnings = field(default_factory=RepeatedWarnings)


async def ingest_event(
    ctx: IngestContext, source_id: str, request: web.Request, clock: Callable[[], float]
) -> web.Response:
    source = ctx.sources.get(source_id)
    if source is None:
        raise ApiError(404, "UNKNOWN_SOURCE", f"no source is configured with id {source_id!r}")
    body = await _read_body(request, ctx.max_body_bytes)
    now = clock()  # received: the whole body is here
    try:
        verify_signature(source.verifier, body, request.headers, now)
    except VerificationError as exc:
        raise ApiError(401, exc.code, exc.message) from None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "INVALID_JSON", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "INVALID_JSON", "the body must be a JSON object")
    if nested_deeper_than(body, payload, MAX_NESTING):
        raise ApiError(400, "INVALID_JSON", f"the body is nested deeper than {MAX_NESTING} levels")
    received_at = datetime.fromtimestamp(now, UTC)
    try:
        event = source.normalise(source.id, payload, received_at)
    except InvalidEvent as exc:
        raise ApiError(400, "INVALID_EVENT", str(exc)) from None
    try:
        result = await ctx.store.ingest(IngestRecord(event, body, received_at))
    except StoreUnavailable as exc:
        held_back = ctx.repeated_warnings.admit("ingest.store_unavailable")
        if held_back is not None:
            log.warning("ingest.store_unavailable", error=str(exc), repeats_not_logged=held_back)
        raise ApiError(
            503, "STORE_UNAVAILABLE", STORE_UNAVAILABLE_MESSAGE, {"Retry-After": "5"}
        ) from None
    answer = {"id": event.id, "seq": result.seq, "duplicate": result.duplicate}
    status = 200 if result.duplicate else 202
    return web.Response(status=status, body=orjson.dumps(answer), headers=_JSON)


def nested_deeper_than(body: bytes, payload: dict[str, Any], limit: int) -> bool:
    """Whether parsed JSON nests objects and arrays more than `limit` levels deep.

    A body with no more brackets than `limit` cannot, which spares the walk most bodies.
    """
    if body.count(b"{") + body.count(b"[") <= limit:
        return False
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack += ((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


async def _read_body(request: web.Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "PAYLOAD_TOO_LARGE", f"the body is larger than {limit} bytes")


def make_ingest_handler(
    ctx: IngestContext, clock: Callable[[], float]
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    record = ctx.metrics.ingest.record

    async def handle(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        source_id = request.match_info["source_id"]
        label = source_id if source_id in ctx.sources else UNKNOWN_SOURCE_LABEL
        try:
            response = await ingest_event(ctx, source_id, request, clock)
        except ApiError as exc:
            record(label, exc.code)
            log.warning("ingest.rejected", source=source_id, code=exc.code, reason=exc.message)
            raise
        outcome = "duplicate" if response.status == 200 else "stored"
        record(label, outcome, time.perf_counter() - started)
        return response

    return handle


def route(ctx: IngestContext, clock: Callable[[], float]) -> Route:
    """`POST /v1/ingest/{source_id}`, authenticated by the source's signature."""
    return Route(
        "POST",
        "/v1/ingest/{source_id}",
        make_ingest_handler(ctx, clock),
        "Receive one provider event",
        tag="ingest",
        body=ProviderEvent,
        replies={
            202: Reply("Stored.", IngestAnswer),
            200: Reply("Stored before: the original `seq`, with `duplicate: true`.", IngestAnswer),
        },
        errors={
            400: ("INVALID_JSON", "INVALID_EVENT"),
            401: ("MISSING_SIGNATURE", "INVALID_SIGNATURE", "TIMESTAMP_OUT_OF_TOLERANCE"),
            404: ("UNKNOWN_SOURCE",),
            413: ("PAYLOAD_TOO_LARGE",),
            503: ("STORE_UNAVAILABLE",),
        },
        description="The signature is checked on the raw body as the source is configured: "
        "Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`, or with the "
        "source's header prefix), HMAC-SHA256 in a header, or a bearer token. The answer comes "
        "only after the event is committed.",
    )
