"""Normalisers: one function per provider, mapping a verified JSON body to an `Event`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from relay.events import Event, TurnError, Usage

MAX_ID_LENGTH = 256

Normaliser = Callable[[str, Mapping[str, Any], datetime], Event]


class InvalidEvent(Exception):
    """The body is JSON but not an event this provider can describe; `field` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def normalise_casedev(source: str, body: Mapping[str, Any], received_at: datetime) -> Event:
    """Case.dev's envelope `{id, type, occurred_at, data: {...camelCase...}}`."""
    data = body.get("data")
    if data is None:
        data = {}
    elif type(data) is not dict:
        raise InvalidEvent("data", "must be an object")
    return Event(
        source=source,
        id=_required_id(body, "id"),
        type=_required_id(body, "type"),
        occurred_at=_timestamp(body, received_at),
        session_id=_optional_id(data, "chatId", "sessionId", "session_id", "chat_id")
        or _optional_id(body, "session_id"),
        turn_id=_optional_id(data, "turnId", "turn_id"),
        data=data,
        usage=_usage(data.get("usage")),
        error=_error(data.get("error")),
        active_turn_id=_optional_id(data, "activeTurnId", "active_turn_id"),
        retry_after_seconds=_number(data, "retryAfter", "retry_after", "retry_after_seconds"),
    )


def normalise_generic(source: str, body: Mapping[str, Any], received_at: datetime) -> Event:
    """Already-canonical JSON: `{id, type, occurred_at, session_id, turn_id, data}`."""
    event = normalise_casedev(source, body, received_at)
    turn_id = _optional_id(body, "turn_id")
    return event if turn_id is None else replace(event, turn_id=turn_id)


NORMALISERS: Mapping[str, Normaliser] = MappingProxyType(
    {"casedev": normalise_casedev, "generic": normalise_generic}
)


def _required_id(body: Mapping[str, Any], field: str) -> str:
    value = body.get(field)
    if type(value) is str and 0 < len(value) <= MAX_ID_LENGTH:
        return value
    if value is None or value == "":
        raise InvalidEvent(field, "is required")
    if not isinstance(value, str) or len(value) > MAX_ID_LENGTH:
        raise InvalidEvent(field, f"must be a string of at most {MAX_ID_LENGTH} characters")
    return value


def _optional_id(body: Mapping[str, Any], *fields: str) -> str | None:
    for field in fields:
        value = body.get(field)
        if value is None or value == "":
            continue
        if type(value) is str and len(value) <= MAX_ID_LENGTH:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str) or len(value) > MAX_ID_LENGTH:
            raise InvalidEvent(field, f"must be a string of at most {MAX_ID_LENGTH} characters")
        return value
    return None


def _timestamp(body: Mapping[str, Any], received_at: datetime) -> datetime:
    for field in ("occurred_at", "created_at", "timestamp"):
        value = body.get(field)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidEvent(field, "must be an RFC 3339 timestamp")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEvent(field, "must be an RFC 3339 timestamp") from None
        if parsed.tzinfo is None:
            raise InvalidEvent(field, "must carry a time zone (e.g. a trailing Z)")
        return parsed.astimezone(UTC)
    return received_at


def _number(body: Mapping[str, Any], *fields: str) -> float | None:
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise InvalidEvent(field, "must be a non-negative number")
        return float(value)
    return None


def _count(usage: Mapping[str, Any], *fields: str) -> int | None:
    for field in fields:
        value = usage.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidEvent(f"usage.{field}", "must be a non-negative integer")
        return value
    return None


def _usage(usage: Any) -> Usage | None:
    if usage is None:
        return None
    if type(usage) is not dict:
        raise InvalidEvent("usage", "must be an object")
    input_tokens = _count(usage, "inputTokens", "input_tokens", "prompt_tokens") or 0
    output_tokens = _count(usage, "outputTokens", "output_tokens", "completion_tokens") or 0
    total = _count(usage, "totalTokens", "total_tokens")
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        reasoning_tokens=_count(usage, "reasoningTokens", "reasoning_tokens") or 0,
        total_tokens=total if total is not None else input_tokens + output_tokens,
        cost_micros=_count(usage, "costMicros", "cost_micros") or 0,
    )


def _error(error: Any) -> TurnError | None:
    if error is None:
        return None
    if isinstance(error, str):
        return TurnError(message=error)
    if type(error) is dict:
        message, code = error.get("message"), error.get("code")
        return TurnError(
            message=str(message) if message is not None else "",
            code=str(code) if code is not None else None,
        )
    raise InvalidEvent("error", "must be a string or an object {message, code}")
