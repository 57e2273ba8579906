"""Normalisers: one function per provider, mapping a verified JSON body to an `Event`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TypeGuard

import orjson

from relay.events import Event, TurnError, Usage
from relay.timefmt import parse_time

MAX_ID_LENGTH = 256
MAX_COUNT = 10**12  # tokens or micro-dollars in one usage field; sums stay far below 2**63
MAX_SECONDS = 10**7
# C0 and C1 control characters (line breaks and NUL among them): never in a type or an id,
# which reach SSE frames, log lines and headers.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NO_CONTROL = "must not contain control characters (line breaks, NUL, ...)"

Normaliser = Callable[[str, Mapping[str, Any], datetime], Event]


class InvalidEvent(Exception):
    """The body is JSON but not an event this provider can describe; `field` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def normalise_casedev(source: str, body: Mapping[str, Any], received_at: datetime) -> Event:
    """Case.dev's envelope `{id, type, occurred_at, data: {...camelCase...}}`.

    Runs once per ingest request, so the common shape (string ids under their first
    alias) is checked inline and anything else falls back to the general helpers.
    """
    get = body.get
    data = get("data")
    if data is None:
        data = {}
    elif type(data) is not dict:
        raise InvalidEvent("data", "must be an object")
    dget = data.get
    event_id, event_type = get("id"), get("type")
    if not _is_id(event_id):
        event_id = _required_id(body, "id")
    if not _is_id(event_type):
        event_type = _required_id(body, "type")
    session_id = dget("chatId")
    if not _is_id(session_id):
        session_id = _optional_id(data, "chatId", "sessionId", "session_id", "chat_id")
        session_id = session_id or _optional_id(body, "session_id")
    turn_id = dget("turnId")
    if not _is_id(turn_id):
        turn_id = _optional_id(data, "turnId", "turn_id")
    usage, error = dget("usage"), dget("error")
    active_turn_id = retry_after = None
    if "activeTurnId" in data or "active_turn_id" in data:
        active_turn_id = _optional_id(data, "activeTurnId", "active_turn_id")
    if "retryAfter" in data or "retry_after" in data or "retry_after_seconds" in data:
        retry_after = _number(data, "retryAfter", "retry_after", "retry_after_seconds")
    return Event(
        source,
        event_id,
        event_type,
        _timestamp(body, received_at),
        session_id,
        turn_id,
        data,
        None if usage is None else _usage(usage),
        None if error is None else _error(error),
        active_turn_id,
        retry_after,
        provider="casedev",
    )


def _is_id(value: object) -> TypeGuard[str]:
    return type(value) is str and 0 < len(value) <= MAX_ID_LENGTH and _CONTROL.search(value) is None


def normalise_generic(source: str, body: Mapping[str, Any], received_at: datetime) -> Event:
    """Already-canonical JSON: `{id, type, occurred_at, session_id, turn_id, provider,
    data}`; `data` may name a tool call (`tool_call_id`, `tool_name`). Events a provider
    minted are stored in this form."""
    event = normalise_casedev(source, body, received_at)
    data = event.data or {}
    return replace(
        event,
        turn_id=_optional_id(body, "turn_id") or event.turn_id,
        tool_call_id=_optional_id(data, "tool_call_id"),
        tool_name=_optional_id(data, "tool_name"),
        provider=_optional_id(body, "provider") or "generic",
    )


def normalise_casedev_or_canonical(
    source: str, body: Mapping[str, Any], received_at: datetime
) -> Event:
    """A Case.dev webhook, or one of its stream frames stored in canonical form."""
    if "provider" in body:
        return normalise_generic(source, body, received_at)
    return normalise_casedev(source, body, received_at)


NORMALISERS: Mapping[str, Normaliser] = MappingProxyType(
    {"casedev": normalise_casedev_or_canonical, "generic": normalise_generic}
)


def normaliser_lookup(providers: Mapping[str, str]) -> Callable[[str], Normaliser]:
    """Source id -> its provider's normaliser (`providers` maps ids to provider names); a
    source no longer configured is read with the casedev normaliser, which reads canonical
    events too."""
    normalisers = {
        source: NORMALISERS.get(provider, normalise_generic)  # the others store canonical events
        for source, provider in providers.items()
    }
    return lambda source: normalisers.get(source, normalise_casedev)


def decoder(providers: Mapping[str, str]) -> Callable[[str, bytes, str], Event]:
    """Turns a stored event `(source, raw payload, received_at)` back into an Event."""
    normaliser = normaliser_lookup(providers)

    def decode(source: str, payload: bytes, received_at: str) -> Event:
        return normaliser(source)(source, orjson.loads(payload), parse_time(received_at))

    return decode


def _required_id(body: Mapping[str, Any], field: str) -> str:
    value = body.get(field)
    if _is_id(value):
        return value
    if value is None or value == "":
        raise InvalidEvent(field, "is required")
    return _checked_id(value, field)


def _checked_id(value: object, field: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_ID_LENGTH:
        raise InvalidEvent(field, f"must be a string of at most {MAX_ID_LENGTH} characters")
    if _CONTROL.search(value) is not None:
        raise InvalidEvent(field, _NO_CONTROL)
    return value


def _optional_id(body: Mapping[str, Any], *fields: str) -> str | None:
    for field in fields:
        value = body.get(field)
        if value is None or value == "":
            continue
        if _is_id(value):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return _checked_id(value, field)
    return None


def _timestamp(body: Mapping[str, Any], received_at: datetime) -> datetime:
    """When the event happened, to the millisecond (the precision the store keeps)."""
    value = body.get("occurred_at")
    if type(value) is str and value.endswith("Z"):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if _EARLIEST <= parsed <= _LATEST:
                return _to_ms(parsed)
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
        out_of_range = InvalidEvent(field, _RANGE_MESSAGE)
        try:
            parsed = parsed.astimezone(UTC)
        except OverflowError:
            raise out_of_range from None
        if not _EARLIEST <= parsed <= _LATEST:
            raise out_of_range
        return _to_ms(parsed)
    return _to_ms(received_at)


_EARLIEST = datetime(1971, 1, 1, tzinfo=UTC)
_LATEST = datetime(2999, 12, 31, tzinfo=UTC)
_RANGE_MESSAGE = (
    f"must lie between {_EARLIEST.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    f" and {_LATEST.strftime('%Y-%m-%dT%H:%M:%SZ')} inclusive"
)


def _to_ms(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _number(body: Mapping[str, Any], *fields: str) -> float | None:
    for field in fields:
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidEvent(field, "must be a non-negative number")
        if not 0 <= value <= MAX_SECONDS:  # also false for NaN
            raise InvalidEvent(field, f"must be a number of seconds from 0 to {MAX_SECONDS}")
        return float(value)
    return None


_USAGE_ALIASES = (
    ("input_tokens", ("inputTokens", "input_tokens", "prompt_tokens")),
    ("output_tokens", ("outputTokens", "output_tokens", "completion_tokens")),
    ("reasoning_tokens", ("reasoningTokens", "reasoning_tokens")),
    ("total_tokens", ("totalTokens", "total_tokens")),
    ("cost_micros", ("costMicros", "cost_micros")),
)


def _usage(usage: Any) -> Usage | None:
    if usage is None:
        return None
    if type(usage) is not dict:
        raise InvalidEvent("usage", "must be an object")
    counts: dict[str, int] = {}
    for name, aliases in _USAGE_ALIASES:
        for alias in aliases:
            value = usage.get(alias)
            if value is None:
                continue
            if type(value) is not int or not 0 <= value <= MAX_COUNT:
                raise InvalidEvent(f"usage.{alias}", f"must be an integer from 0 to {MAX_COUNT}")
            counts[name] = value
            break
    if "total_tokens" not in counts:
        counts["total_tokens"] = counts.get("input_tokens", 0) + counts.get("output_tokens", 0)
    return Usage(**counts)


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


# The helpers providers share to read their frames.
read_time = _timestamp
read_usage = _usage
read_error = _error
optional_id = _optional_id
