"""The ingest pipeline without HTTP: verify, normalise, store one request's body.

The ingest endpoint, and anything else that receives a platform's bytes (a connector
that taps or follows a stream), hands the body and its headers here and gets back what
was stored. A body is one webhook event (stored as it came, for the `casedev` and
`generic` providers), or frames: a forwarded stream (`text/event-stream`,
`application/x-ndjson`), or the payload of a provider that mints its events. Frames
become canonical events, stored in one transaction, all or none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from relay.errors import ApiError
from relay.normalize import InvalidEvent
from relay.providers import WEBHOOK_PROVIDERS, Context, Frame
from relay.providers.canonical import encode
from relay.providers.frames import STREAM_TYPES, parse_frames
from relay.store import IngestRecord, Store, StoreUnavailable
from relay.verify import VerificationError, verify_signature

if TYPE_CHECKING:
    from relay.events import Event
    from relay.ingest import Source

T = TypeVar("T")

# Deeper JSON could not be encoded again (orjson stops at 255 levels): refused up front.
MAX_NESTING = 200
STORE_UNAVAILABLE_MESSAGE = "the store cannot take writes right now; retry later"


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A single webhook event: its id, its place in the log, whether it came before."""

    id: str
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StoredFrames:
    """Frames: how many events they gave, how many were new, how many came before."""

    events: int
    stored: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class Request:
    """One request's body and what came with it."""

    headers: Mapping[str, str]
    body: bytes
    content_type: str = "application/json"
    session_id: str | None = None  # the `session_id` query parameter


async def ingest_body(
    store: Store, source: Source, request: Request, now: float
) -> StoredEvent | StoredFrames:
    """Verify, normalise and store; raise ApiError (with its code) for what is refused."""
    try:
        verify_signature(source.verifier, request.body, request.headers, now)
    except VerificationError as exc:
        raise ApiError(401, exc.code, exc.message) from None
    received_at = datetime.fromtimestamp(now, UTC)
    if request.content_type in STREAM_TYPES or source.provider.name not in WEBHOOK_PROVIDERS:
        events = to_events(source, request, received_at)
        records = [IngestRecord(event, encode(event), received_at) for event in events]
        results = await _stored(store.ingest_many(records)) if records else []
        duplicates = sum(result.duplicate for result in results)
        return StoredFrames(len(results), len(results) - duplicates, duplicates)
    event = to_events(source, request, received_at)[0]
    result = await _stored(store.ingest(IngestRecord(event, request.body, received_at)))
    return StoredEvent(event.id, result.seq, result.duplicate)


def to_events(source: Source, request: Request, received_at: datetime) -> list[Event]:
    """The canonical events of a (verified) body, without storing them."""
    stream = request.content_type in STREAM_TYPES
    try:
        if stream:
            frames = parse_frames(request.content_type, request.body)
        else:
            frames = [Frame(0, _json_object(request.body))]
        for frame in frames:
            if nested_deeper_than(request.body, frame.data, MAX_NESTING):
                where = f"frame {frame.index}: " if stream else ""
                raise ApiError(
                    400, "INVALID_JSON", f"{where}nested deeper than {MAX_NESTING} levels"
                )
        if not stream and source.provider.name in WEBHOOK_PROVIDERS:
            return [source.normalise(source.id, frames[0].data, received_at)]
        stream_id = request.headers.get(source.header_prefix + "id") or None
        ctx = Context(source.id, received_at, stream_id, request.session_id)
        return source.provider.events(frames, ctx)
    except InvalidEvent as exc:
        raise ApiError(400, "INVALID_EVENT", str(exc)) from None


def _json_object(body: bytes) -> dict[str, object]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(400, "INVALID_JSON", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "INVALID_JSON", "the body must be a JSON object")
    return payload


def nested_deeper_than(body: bytes, payload: Any, limit: int) -> bool:
    """Whether parsed JSON nests objects and arrays more than `limit` levels deep.

    A body with no more brackets than `limit` cannot, which spares the walk most bodies.
    """
    if body.count(b"{") + body.count(b"[") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack += ((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


async def _stored(write: Awaitable[T]) -> T:
    """The write's result; a store that cannot write is a 503 that names no internals
    (the cause stays on the error, for the log)."""
    try:
        return await write
    except StoreUnavailable as exc:
        raise ApiError(
            503, "STORE_UNAVAILABLE", STORE_UNAVAILABLE_MESSAGE, {"Retry-After": "5"}
        ) from exc
