"""Managing subscriptions: request bodies, secrets and views, shared by the API and the CLI."""

from __future__ import annotations

import ipaddress
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator
from yarl import URL

from relay.timefmt import format_unix
from relay.webhooks.dispatcher import previous_secret_binding, routing_key_binding
from relay.webhooks.formats import Format
from relay.webhooks.headers import check_headers
from relay.webhooks.model import (
    Attempt,
    Delivery,
    Ordering,
    PreviousSecret,
    Subscription,
    delivery_message_id,
)
from relay.webhooks.secrets import SecretBox, SecretBoxError, new_webhook_secret
from relay.webhooks.store import DeliveryStore, SecretChanged

DEFAULT_MAX_IN_FLIGHT = 10
_ROTATION_TRIES = 5
_HEX = frozenset("0123456789abcdef")
_Globs = list[str]
_URL_SCHEMA: dict[str, JsonValue] = {
    "format": "uri",
    "description": "An absolute http or https URL, without credentials.",
}


def _check_url(url: str) -> str:
    try:
        parsed = URL(url)
    except (TypeError, ValueError):
        raise ValueError("must be an absolute http or https URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("must be an absolute http or https URL")
    if parsed.user is not None or parsed.password is not None:
        raise ValueError("must not carry credentials")
    problem = numeric_host_problem(parsed.host)
    if problem is not None:
        raise ValueError(problem)
    return url


def numeric_host_problem(host: str) -> str | None:
    """Why a host that ends in a number is unusable: it must then be a dotted-quad IPv4.

    Integer, octal, hex and shortened forms (`2130706433`, `0177.0.0.1`, `0x7f.1`,
    `127.1`) are read differently by different resolvers, and no client connects to them.
    """
    last = host.split(".")[-1].lower()
    numeric = last.isdigit() or (last.startswith("0x") and all(c in _HEX for c in last[2:]))
    if not numeric or ":" in host:
        return None
    try:
        canonical = str(ipaddress.IPv4Address(host))
    except ValueError:
        canonical = ""
    if canonical == host:
        return None
    return (
        f"host {host!r} ends in a number but is not an IPv4 address written as four"
        " decimal numbers (like 192.0.2.1)"
    )


def _check_globs(values: _Globs | None) -> _Globs | None:
    if values is None:
        return None
    if len(values) > 100:
        raise ValueError("at most 100 entries")
    for value in values:
        if not 1 <= len(value) <= 200 or any(ch in value for ch in "\r\n\0"):
            raise ValueError("each entry is a name or glob of 1 to 200 characters")
    return values


class SubscriptionFields(BaseModel):
    """Fields a client may set; absent ones keep their value (PATCH) or default (POST)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(None, max_length=2048, json_schema_extra=_URL_SCHEMA)
    types: _Globs | None = None
    session_ids: _Globs | None = None
    description: str | None = Field(None, max_length=1000)
    ordering: Ordering | None = None
    max_in_flight: int | None = Field(None, ge=1, le=1000)
    enabled: bool | None = None
    format: Format | None = Field(
        None, description="`standard` (default), `slack` or `pagerduty`: the body's shape."
    )
    routing_key: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[\x21-\x7e]+$",
        description="The PagerDuty integration key; required for, and only for, `pagerduty`.",
    )
    headers: dict[str, str] | None = Field(
        None,
        description="Static headers added to every request; a value `env:VAR` is read from"
        " the relay's environment when sending. Hop-by-hop, framing and signature headers"
        " are refused.",
    )

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, headers: dict[str, str] | None) -> dict[str, str] | None:
        if headers is not None:
            check_headers(headers)
        return headers

    @field_validator("url")
    @classmethod
    def _valid_url(cls, url: str | None) -> str | None:
        return None if url is None else _check_url(url)

    @field_validator("types", "session_ids")
    @classmethod
    def _valid_globs(cls, values: _Globs | None) -> _Globs | None:
        return _check_globs(values)


class NewSubscription(SubscriptionFields):
    url: str = Field(max_length=2048, json_schema_extra=_URL_SCHEMA)
    enabled: None = None  # a new subscription starts enabled

    @model_validator(mode="after")
    def _routing_key_for_pagerduty(self) -> NewSubscription:
        problem = format_problem(self.format or Format.STANDARD, self.routing_key is not None)
        if problem is not None:
            raise ValueError(problem)
        return self


def default_ordering(fmt: Format | None) -> Ordering:
    """PagerDuty needs a resolve to follow its trigger: its deliveries go in session order
    (every dedup key belongs to one session) unless asked otherwise."""
    return Ordering.SESSION if fmt is Format.PAGERDUTY else Ordering.NONE


def format_problem(fmt: Format, has_routing_key: bool) -> str | None:
    """Why a format and a routing key do not go together, or None if they do."""
    if fmt is Format.PAGERDUTY and not has_routing_key:
        return "routing_key is required when format is pagerduty"
    if fmt is not Format.PAGERDUTY and has_routing_key:
        return "routing_key is only for format pagerduty"
    return None


def iso(seconds: float | None) -> str | None:
    return None if seconds is None else format_unix(seconds)


async def create_subscription(
    store: DeliveryStore, box: SecretBox, fields: NewSubscription, now: float
) -> tuple[Subscription, str]:
    """Store a subscription with a fresh secret; return it and the secret (shown once)."""
    subscription_id = "sub_" + secrets.token_hex(8)
    secret = new_webhook_secret()
    created = iso(now) or ""
    subscription = await store.add_subscription(
        Subscription(
            id=subscription_id,
            url=fields.url,
            description=fields.description or "",
            types=tuple(fields.types or ()),
            session_ids=tuple(fields.session_ids or ()),
            ordering=fields.ordering or default_ordering(fields.format),
            max_in_flight=fields.max_in_flight or DEFAULT_MAX_IN_FLIGHT,
            enabled=True,
            disabled_reason=None,
            secret=box.encrypt(secret, subscription_id),
            previous_secrets=(),
            failing_since=None,
            start_after=0,
            created_at=created,
            updated_at=created,
            format=fields.format or Format.STANDARD,
            routing_key=None
            if fields.routing_key is None
            else box.encrypt(fields.routing_key, routing_key_binding(subscription_id)),
            headers=tuple(check_headers(fields.headers or {})),
        )
    )
    return subscription, secret


def updates(
    fields: SubscriptionFields, now: float, current: Subscription, box: SecretBox
) -> dict[str, Any]:
    """The columns a PATCH sets; ValueError if the format and routing key would not go
    together (a PagerDuty one needs a key; switching away from it drops the key)."""
    changed: dict[str, Any] = fields.model_dump(exclude_none=True)
    fmt = fields.format or current.format
    routing_key = changed.pop("routing_key", None)
    has_key = routing_key is not None or (
        current.routing_key is not None and fields.format in (None, Format.PAGERDUTY)
    )
    problem = format_problem(fmt, has_key)
    if problem is not None:
        raise ValueError(problem)
    if routing_key is not None:
        changed["routing_key"] = box.encrypt(routing_key, routing_key_binding(current.id))
    elif fmt is not Format.PAGERDUTY and current.routing_key is not None:
        changed["routing_key"] = None
    if "headers" in changed:
        changed["headers"] = check_headers(changed["headers"])
    if fields.format is Format.PAGERDUTY and fields.ordering is None:
        changed["ordering"] = default_ordering(fmt)
    if "enabled" in changed:
        changed["disabled_reason"] = None if changed["enabled"] else "disabled through the API"
        changed["enabled_changed_at"] = now
        if changed["enabled"]:
            changed["failing_since"] = None
    changed["updated_at"] = iso(now)
    return changed


async def rotate_secret(
    store: DeliveryStore, box: SecretBox, subscription: Subscription, now: float, overlap: float
) -> tuple[Subscription, str] | None:
    """Give the subscription a new secret; the current one keeps signing for `overlap` s
    (as do earlier ones until their own ends). One store transaction that fails if another
    rotation came first; then it starts again from that one."""
    secret = new_webhook_secret()
    found: Subscription | None = subscription
    for _ in range(_ROTATION_TRIES):
        if found is None:
            return None
        try:
            old = box.decrypt(found.secret, found.id)
        except SecretBoxError:  # cannot sign anyway: the new secret replaces it
            previous = None
        else:
            binding = previous_secret_binding(found.id)
            previous = PreviousSecret(box.encrypt(old, binding), now + overlap)
        new = box.encrypt(secret, found.id)
        try:
            rotated = await store.rotate_secret(
                found.id, found.secret, new, previous, now, iso(now) or ""
            )
        except SecretChanged:
            found = await store.get_subscription(found.id)
            continue
        return None if rotated is None else (rotated, secret)
    raise SecretChanged(subscription.id)


def subscription_view(s: Subscription, now: float, queue_depth: int) -> dict[str, Any]:
    until = max((p.until for p in s.previous_secrets), default=None)
    return {
        "id": s.id,
        "url": s.url,
        "description": s.description,
        "types": list(s.types),
        "session_ids": list(s.session_ids),
        "ordering": s.ordering.value,
        "max_in_flight": s.max_in_flight,
        "enabled": s.enabled,
        "disabled_reason": s.disabled_reason,
        "failing_since": iso(s.failing_since),
        "previous_secret_expires_at": iso(until) if until is not None and until > now else None,
        "format": s.format.value,
        "routing_key_set": s.routing_key is not None,
        "headers": {name: _shown(value) for name, value in s.headers},
        "queue_depth": queue_depth,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
    }


def _shown(value: str) -> str:
    """A header's value as the API shows it: an `env:` reference as it is, a literal
    value (it may be a token) hidden."""
    return value if value.startswith("env:") else "********"


def attempt_view(a: Attempt) -> dict[str, Any]:
    return {
        "at": iso(a.at),
        "status_code": a.status_code,
        "latency_ms": a.latency_ms,
        "response": a.response,
        "error": a.error,
    }


def delivery_view(d: Delivery, attempts: list[Attempt]) -> dict[str, Any]:
    return {
        "id": d.id,
        "subscription_id": d.subscription_id,
        "change_id": d.change_id,
        "message_id": delivery_message_id(d.id, d.change_id),
        "type": d.type,
        "session_id": d.session_id,
        "status": d.status.value,
        "attempt_count": d.attempts,
        "next_attempt_at": iso(d.next_attempt_at),
        "last_status": d.last_status,
        "last_error": d.last_error,
        "created_at": iso(d.created_at),
        "updated_at": iso(d.updated_at),
        "attempts": [attempt_view(a) for a in attempts],
    }
