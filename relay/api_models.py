"""The API's data as pydantic models: response shapes and the query parameters handlers accept.

Handlers validate their query strings with these models. The hot paths (an ingest answer,
stored snapshots) keep writing plain dicts and stored JSON; the models describe them for
`/openapi.json`, and tests validate real answers against them so the two cannot drift.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from relay.state import ChangeType, Readiness, SessionTurnStatus, TurnStatus

MAX_LIMIT = 1000
MAX_ID = 2**62
MAX_WAIT_SECONDS = 60

Id = Annotated[int, Field(ge=0, le=MAX_ID)]


# A change id to resume after (an empty parameter, like any, counts as absent).
ResumeId = Id | None


class _Shape(BaseModel):
    """A response object: every field is always present; unknown fields are a drift."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# -- errors and operations -------------------------------------------------------------------


class ErrorDetail(_Shape):
    code: str = Field(description="A stable, machine-readable error code.")
    message: str = Field(description="What went wrong, for people.")


class ErrorEnvelope(_Shape):
    """Every error answer: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


class Health(_Shape):
    status: Literal["ok"]


class Readyz(_Shape):
    status: Literal["ready"]


# -- ingest ----------------------------------------------------------------------------------


class IngestAnswer(_Shape):
    """The answer to an accepted event: stored now (202) or stored before (200)."""

    id: str = Field(description="The event's id, as the provider sent it.")
    seq: int = Field(description="The event's position in the relay's event log.")
    duplicate: bool = Field(description="True when this (source, event id) was stored before.")


class ForwardAnswer(_Shape):
    """The answer to frames: a forwarded stream, or a provider's payload that gives
    several events (a Motus callback)."""

    events: int = Field(description="Canonical events the frames gave.")
    stored: int = Field(description="Of those, stored now.")
    duplicates: int = Field(description="Of those, stored before (same source and event id).")


class IngestAccepted(RootModel[IngestAnswer | ForwardAnswer]):
    """One event stored (`id`, `seq`, `duplicate`), or frames stored (their counts)."""


class ProviderEvent(BaseModel):
    """A provider's event as it sends it; Case.dev's envelope is shown, other fields pass."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="The provider's event id; a repeat is stored once.")
    type: str = Field(description="The event type, e.g. `agent.worker.ready`.")
    occurred_at: datetime | None = Field(None, description="When it happened (RFC 3339).")
    data: dict[str, Any] | None = Field(
        None, description="The event's fields; the session id is in `data.chatId`."
    )


# -- derived state ---------------------------------------------------------------------------


class Usage(_Shape):
    input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost_micros: int


class TurnError(_Shape):
    message: str
    code: str | None


class TurnCounts(_Shape):
    turns: int
    completed: int
    failed: int
    conflicts: int


class ToolCalls(_Shape):
    count: int = Field(description="Tool calls the turn made.")
    running: list[str] = Field(description="Names of the tools running now.")


class TurnState(_Shape):
    """One chat turn's derived status."""

    session_id: str
    turn_id: str
    status: TurnStatus
    started_at: datetime | None
    ended_at: datetime | None
    duration_ms: int | None
    usage: Usage | None
    error: TurnError | None
    active_turn_id: str | None = Field(description="The turn that was active (conflicts only).")
    retry_after_seconds: float | None = Field(description="When to retry (conflicts only).")
    updated_at: datetime = Field(description="The turn's last activity.")
    tool_calls: ToolCalls
    version: int = Field(description="Grows by one on every change of this turn.")


class SessionState(_Shape):
    """One session's derived readiness and turn status."""

    session_id: str
    provider: str | None = Field(description="The provider of the session's sources.")
    readiness: Readiness
    runtime_reused: bool | None
    scope_activated: bool
    worker_ready: bool
    created_at: datetime
    ready_at: datetime | None
    time_to_ready_ms: int | None
    turn_status: SessionTurnStatus
    active_turn_id: str | None
    last_turn: TurnState | None
    counts: TurnCounts
    usage: Usage
    first_event_at: datetime
    last_event_at: datetime
    version: int = Field(description="Grows by one on every change of this session.")


class ChangeCause(_Shape):
    """The event that caused a change."""

    event_id: str
    source: str
    type: str


class Change(_Shape):
    """One entry of the change log, as the read API, SSE and webhooks carry it."""

    id: int = Field(description="The change's position in the change log.")
    type: ChangeType
    occurred_at: datetime
    session_id: str
    turn_id: str | None
    session: SessionState | None
    turn: TurnState | None
    cause: ChangeCause | None = Field(description="Null for alerts, which the relay's clock fires.")


class RawChange(_Shape):
    """A stored event as a change (`raw.<event type>`), for filters that name `raw.*`."""

    id: int = Field(description="The change's position in the change log.")
    type: str = Field(pattern=r"^raw\.", description="`raw.` and the event's type.")
    occurred_at: datetime
    session_id: str | None
    turn_id: str | None
    session: None
    turn: None
    cause: ChangeCause
    event: dict[str, Any] = Field(description="The event's body as the provider sent it.")


class StoredEvent(_Shape):
    """A raw event as it was received, with the fields the relay lifted out of it."""

    seq: int
    source: str
    id: str
    type: str
    session_id: str | None
    turn_id: str | None
    occurred_at: datetime
    received_at: datetime
    payload: dict[str, Any] = Field(description="The body exactly as the provider sent it.")


# -- pages -----------------------------------------------------------------------------------


def next_after() -> Any:
    """The field of a page (of an `AfterQuery`) that says where the next one starts."""
    return Field(description="Pass as `after` for the next page; null at the end.")


class EventLogPage(_Shape):
    items: list[StoredEvent]
    next_after: int | None = next_after()


class ChangePage(_Shape):
    items: list[Change | RawChange]
    next_after: int | None = next_after()


class SessionPage(_Shape):
    items: list[SessionState]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class TurnPage(_Shape):
    items: list[TurnState]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


class SessionEventPage(_Shape):
    items: list[StoredEvent]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page.")


# -- query parameters ------------------------------------------------------------------------


class _Query(BaseModel):
    """Query parameters; unknown ones are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)


def _limit(default: int) -> Any:
    return Field(default, ge=1, le=MAX_LIMIT, description="The most items to return.")


def _after() -> Any:
    return Field(0, description="Return items after this position (exclusive).")


def _cursor() -> Any:
    return Field(None, description="The `next_cursor` of the previous page.")


def _types() -> Any:
    return Field(
        default_factory=tuple,
        description="Change types to include: exact names or globs (`turn.*`); repeat or "
        "separate with commas. Default: all.",
    )


class AfterQuery(_Query):
    """A page of a list in id order: `limit` items after a position."""

    after: Id = _after()
    limit: int = _limit(100)


class EventLogQuery(AfterQuery):
    pass


class ChangesQuery(AfterQuery):
    type: tuple[str, ...] = _types()


class SessionsQuery(_Query):
    limit: int = _limit(50)
    cursor: str | None = _cursor()
    readiness: Readiness | None = Field(None, description="Only sessions with this readiness.")
    turn_status: SessionTurnStatus | None = Field(
        None, description="Only sessions with this turn status."
    )


class SessionQuery(_Query):
    wait: bool = Field(False, description="Hold the request until `version` is exceeded.")
    version: Id = Field(0, description="With `wait`: the version the caller already has.")
    timeout: int = Field(
        30, ge=0, le=MAX_WAIT_SECONDS, description="With `wait`: the most seconds to hold."
    )


class PageQuery(_Query):
    limit: int = _limit(100)
    cursor: str | None = _cursor()


class StreamQuery(_Query):
    session_id: tuple[str, ...] = Field(
        default_factory=tuple,
        description="Sessions to include: exact ids or globs; repeat or separate with commas.",
    )
    type: tuple[str, ...] = _types()
    last_event_id: ResumeId = Field(
        None, description="Resume after this change id (as the `Last-Event-ID` header)."
    )


class StreamHeaders(_Query):
    last_event_id: ResumeId = Field(
        None,
        alias="Last-Event-ID",
        description="Resume after this change id; sent by EventSource on reconnection.",
    )
