"""The webhook API's data as pydantic models: answers, the deliveries query and `recover`'s body.

Subscription bodies (`NewSubscription`, `SubscriptionFields`) live in
`relay.webhooks.subscriptions`, shared with the CLI. Handlers answer with the plain dicts
of `subscription_view` and `delivery_view`; tests validate them against these models.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from relay.api_models import AfterQuery, next_after
from relay.timefmt import parse_time
from relay.webhooks.formats import Format
from relay.webhooks.model import DeliveryStatus, Ordering


class _Shape(BaseModel):
    """A response object: every field is always present; unknown fields are a drift."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SubscriptionView(_Shape):
    """A subscription as the API shows it (never with its secret)."""

    id: str
    url: str
    description: str
    types: list[str] = Field(description="Change types (names or globs); empty: all but `raw.*`.")
    session_ids: list[str] = Field(description="Session ids (names or globs); empty: all.")
    ordering: Ordering
    max_in_flight: int
    enabled: bool
    disabled_reason: str | None
    failing_since: datetime | None = Field(
        description="When deliveries started failing without a success since."
    )
    previous_secret_expires_at: datetime | None = Field(
        description="Until when the rotated-out secret still signs alongside the new one."
    )
    format: Format = Field(description="`standard`, `slack` or `pagerduty`.")
    routing_key_set: bool = Field(description="Whether a PagerDuty routing key is set.")
    headers: dict[str, str] = Field(
        description="Static headers; literal values are hidden, `env:VAR` ones shown."
    )
    queue_depth: int = Field(description="Its deliveries not yet delivered or failed.")
    created_at: datetime
    updated_at: datetime


class SubscriptionWithSecret(SubscriptionView):
    """A new subscription, or one with a new secret: the secret is shown this once."""

    secret: str = Field(description="The signing secret (`whsec_…`); it is not shown again.")


class SubscriptionList(_Shape):
    items: list[SubscriptionView]
    next_after: int | None = next_after()


class SubscriptionsQuery(AfterQuery):
    pass


class AttemptView(_Shape):
    """One delivery attempt."""

    at: datetime
    status_code: int | None = Field(description="The endpoint's status; null if none came.")
    latency_ms: float
    response: str | None = Field(description="The first 1 KiB of the endpoint's answer.")
    error: str | None


class DeliveryView(_Shape):
    """One change (or test event) on its way to one subscription, with its attempts."""

    id: int
    subscription_id: str
    change_id: int | None = Field(description="Null for a test event.")
    message_id: str = Field(description="The `webhook-id` header, the same on every attempt.")
    type: str
    session_id: str | None
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    attempts: list[AttemptView]


class DeliveryPage(_Shape):
    items: list[DeliveryView]
    next_after: int | None = next_after()


class Requeued(_Shape):
    queued: int = Field(description="How many deliveries were queued.")


class DeliveriesQuery(AfterQuery):
    status: DeliveryStatus | None = Field(None, description="Only deliveries with this status.")


class Recovery(BaseModel):
    """`POST /v1/subscriptions/{id}/recover`: queue again what was missed since a moment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    since: str = Field(
        description="An RFC 3339 time with a UTC offset.",
        json_schema_extra={"format": "date-time"},
    )

    @field_validator("since")
    @classmethod
    def _valid_time(cls, since: str) -> str:
        try:
            moment = datetime.fromisoformat(since)
            if moment.tzinfo is None:
                raise ValueError
            parse_time(since)
        except (ValueError, OverflowError):
            raise ValueError("must be an RFC 3339 time with a UTC offset") from None
        return since
