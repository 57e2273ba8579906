"""The canonical event: what every provider's webhook is normalised into."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any


class EventType(StrEnum):
    """Lifecycle event types the state machine understands; others are stored only."""

    SESSION_CREATED = "agent.chat.session.created"
    RUNTIME_REUSED = "agent.runtime.reused"
    RUNTIME_STARTED = "agent.runtime.started"
    SCOPE_ACTIVATED = "agent.scope.activated"
    WORKER_READY = "agent.worker.ready"
    TURN_STARTED = "agent.chat.turn.started"
    TURN_COMPLETED = "agent.chat.turn.completed"
    TURN_FAILED = "agent.chat.turn.failed"
    TURN_CONFLICT = "agent.chat.turn.conflict"
    TOOL_STARTED = "agent.chat.turn.tool.started"
    TOOL_COMPLETED = "agent.chat.turn.tool.completed"
    TURN_ACTIVITY = "agent.chat.turn.activity"


@dataclass(frozen=True, slots=True)
class Usage:
    """Token and cost usage of one turn, in the relay's own field names."""

    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost_micros: int = 0


@dataclass(frozen=True, slots=True)
class TurnError:
    """Why a turn failed."""

    message: str
    code: str | None = None


@dataclass(slots=True)
class Event:
    """One provider event after normalisation; treat it as immutable.

    `occurred_at` is when the provider says it happened (timezone-aware UTC);
    the provider-specific fields the state machine needs are lifted out of `data`.
    Tool events name their call (`tool_call_id`, `tool_name`); an activity event (text a
    turn streamed) only moves the turn's last activity. `provider` names the provider
    that produced the event. Not `frozen`: a frozen dataclass's __init__ costs several
    times more, and one Event is built for every ingest request.
    """

    source: str
    id: str
    type: str
    occurred_at: datetime
    session_id: str | None = None
    turn_id: str | None = None
    data: Mapping[str, Any] | None = None
    usage: Usage | None = None
    error: TurnError | None = None
    active_turn_id: str | None = None
    retry_after_seconds: float | None = None
    tool_call_id: str | None = None
    tool_name: str | None = None
    provider: str | None = None
