"""Split a forwarded body into frames: Server-Sent Events or NDJSON, one JSON object each."""

from __future__ import annotations

import re
from typing import Any

import orjson

from relay.normalize import InvalidEvent
from relay.providers.base import Frame

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
STREAM_TYPES = (SSE, NDJSON)
_LINE = re.compile(rb"\r\n|\r|\n")
_ENVELOPE = {"id", "event", "data"}


def parse_frames(content_type: str, body: bytes) -> list[Frame]:
    """The frames of a `text/event-stream` or `application/x-ndjson` body, in order."""
    if content_type == SSE:
        return _sse(body)
    if content_type == NDJSON:
        return _ndjson(body)
    raise ValueError(f"not a stream content type: {content_type}")


def _sse(body: bytes) -> list[Frame]:
    """Per the SSE parsing rules: a blank line dispatches the fields seen since the last
    one; an event without data dispatches nothing; comments and `retry` are skipped."""
    frames: list[Frame] = []
    data: list[bytes] = []
    event_id = name = None
    for line in [*_LINE.split(body), b""]:
        if not line:
            if data:
                frames.append(_frame(len(frames), b"\n".join(data), event_id, name))
            data, event_id, name = [], None, None
            continue
        if line.startswith(b":"):
            continue
        key, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if key == b"data":
            data.append(value)
        elif key == b"event":
            name = _text(value, len(frames), "event") or None
        elif key == b"id":
            event_id = _text(value, len(frames), "id") or None
    return frames


def _ndjson(body: bytes) -> list[Frame]:
    """One JSON object a line; `{"event", "id", "data": {...}}` is an SSE frame's fields."""
    frames: list[Frame] = []
    for line in _LINE.split(body):
        if not line.strip():
            continue
        frame = _frame(len(frames), line, None, None)
        data = frame.data
        if isinstance(data.get("data"), dict) and set(data) <= _ENVELOPE:
            event_id, name = data.get("id"), data.get("event")
            if not isinstance(event_id, str | None) or not isinstance(name, str | None):
                raise InvalidEvent(f"frame {frame.index}", "id and event must be strings")
            frame = Frame(frame.index, data["data"], event_id or None, name or None)
        frames.append(frame)
    return frames


def _frame(index: int, raw: bytes, event_id: str | None, name: str | None) -> Frame:
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidEvent(f"frame {index}", "data is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"frame {index}", "data must be a JSON object")
    return Frame(index, data, event_id, name)


def _text(value: bytes, index: int, field: str) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise InvalidEvent(f"frame {index}", f"{field} is not UTF-8") from None
