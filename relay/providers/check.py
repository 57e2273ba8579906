"""`relay sources check`: what a payload becomes, as canonical events, without storing it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import orjson

from relay.config import SourceSettings
from relay.events import Event
from relay.providers.frames import NDJSON, SSE

JSON = "application/json"


def guess_content_type(path: Path, body: bytes) -> str:
    """By the file's suffix (.sse, .ndjson, .jsonl, .json), else by its content."""
    suffix = path.suffix.lower()
    if suffix in (".sse", ".txt"):
        return SSE
    if suffix in (".ndjson", ".jsonl"):
        return NDJSON
    if suffix == ".json":
        return JSON
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        first = body.lstrip().split(b"\n", 1)[0]
        return SSE if first.startswith((b"data:", b"event:", b"id:", b":")) else NDJSON
    return JSON


def check_payload(
    settings: SourceSettings,
    body: bytes,
    content_type: str,
    stream_id: str | None = None,
    session_id: str | None = None,
    now: float | None = None,
) -> list[Event]:
    """The canonical events `body` gives at `settings`'s source (raises ApiError as the
    ingest endpoint would answer); the signature is not checked."""
    from relay.ingest import Source
    from relay.pipeline import Request, to_events

    source = Source.from_settings(settings)
    headers = {} if stream_id is None else {settings.header_prefix + "id": stream_id}
    received_at = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return to_events(source, Request(headers, body, content_type, session_id), received_at)
