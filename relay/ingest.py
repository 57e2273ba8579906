"""`POST /v1/ingest/{source_id}`: verify, parse, normalise, store, then answer."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import orjson
import structlog
from aiohttp import web

from relay.api_models import IngestAccepted, IngestAnswer, ProviderEvent
from relay.config import SourceSettings
from relay.errors import ApiError
from relay.logs import RepeatedWarnings
from relay.metrics import Metrics
from relay.normalize import NORMALISERS, Normaliser, normalise_generic
from relay.pipeline import Request, StoredFrames, ingest_body
from relay.providers import Provider, build_provider
from relay.routes import Reply, Route
from relay.store import Store
from relay.verify import Verifier

log = structlog.get_logger("relay.ingest")

UNKNOWN_SOURCE_LABEL = "(unknown)"
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class Source:
    """A configured source, ready to verify and normalise its requests."""

    id: str
    verifier: Verifier
    normalise: Normaliser
    provider: Provider
    header_prefix: str = "webhook-"

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> Source:
        return cls(
            settings.id,
            Verifier.from_settings(settings),
            NORMALISERS.get(settings.provider, normalise_generic),
            build_provider(settings),
            settings.header_prefix,
        )


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
    session_id = request.query.get("session_id") or None
    stored = await ingest_body(
        ctx.store, source, Request(request.headers, body, request.content_type, session_id), now
    )
    if isinstance(stored, StoredFrames):
        answer: dict[str, object] = {
            "events": stored.events,
            "stored": stored.stored,
            "duplicates": stored.duplicates,
        }
        return web.Response(status=202, body=orjson.dumps(answer), headers=_JSON)
    answer = {"id": stored.id, "seq": stored.seq, "duplicate": stored.duplicate}
    status = 200 if stored.duplicate else 202
    return web.Response(status=status, body=orjson.dumps(answer), headers=_JSON)


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
            if exc.code == "STORE_UNAVAILABLE":
                held_back = ctx.repeated_warnings.admit("ingest.store_unavailable")
                if held_back is not None:
                    log.warning(
                        "ingest.store_unavailable",
                        error=str(exc.__cause__),
                        repeats_not_logged=held_back,
                    )
            else:
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
            202: Reply(
                "Stored; frames (a forwarded stream, a provider's callback) answer with counts.",
                IngestAccepted,
            ),
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
        "only after the event is committed.\n\nForward: a body of `Content-Type: "
        "text/event-stream` (the frames as received) or `application/x-ndjson` (one frame a "
        'line, its data or `{"event", "id", "data"}`), signed over the whole body, is a '
        "stream: the request's `{prefix}id` names it, a frame without its own id is event "
        "`{stream id}:{frame index}`, frames that name no session take the `session_id` query "
        "parameter. Its events are stored in one transaction; one malformed frame refuses the "
        "request with 400 `INVALID_EVENT` naming the frame, and nothing is stored.",
    )
