"""Normalisers map provider JSON to the canonical event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from relay.events import TurnError, Usage
from relay.normalize import InvalidEvent, normalise_casedev, normalise_generic
from tests.conftest import fixture_events

RECEIVED = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def casedev(body: dict[str, Any]) -> Any:
    return normalise_casedev("casedev", body, RECEIVED)


def test_fixture_fields_are_lifted() -> None:
    """Session, turn, usage, error and conflict fields come out of Case.dev's data."""
    events = [casedev(e) for e in fixture_events()]
    assert {e.session_id for e in events} == {"chat_01JD7Q8M2X"}
    assert events[0].occurred_at == datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    assert events[5].usage == Usage(
        input_tokens=5120, output_tokens=812, total_tokens=5932, cost_micros=27600
    )
    assert events[7].turn_id == "turn_003"
    assert events[7].active_turn_id == "turn_002"
    assert events[7].retry_after_seconds == 5.0
    assert events[8].error == TurnError(message="vault search timed out", code="TOOL_TIMEOUT")


@pytest.mark.parametrize(
    ("body", "session_id"),
    [
        ({"data": {"chatId": "a"}}, "a"),
        ({"data": {"sessionId": "b"}}, "b"),
        ({"data": {"session_id": "c"}}, "c"),
        ({"data": {"chat_id": "d"}}, "d"),
        ({"session_id": "e", "data": {}}, "e"),
        ({"data": {}}, None),
    ],
)
def test_session_id_aliases(body: dict[str, Any], session_id: str | None) -> None:
    """Every session id alias in the contract is accepted."""
    assert casedev({"id": "evt", "type": "t", **body}).session_id == session_id


def test_usage_and_error_aliases() -> None:
    """OpenAI-style usage names and a plain-string error are understood."""
    event = casedev(
        {
            "id": "evt",
            "type": "agent.chat.turn.failed",
            "data": {
                "turn_id": "t1",
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "reasoningTokens": 2},
                "error": "boom",
            },
        }
    )
    assert event.turn_id == "t1"
    assert event.usage == Usage(
        input_tokens=10, output_tokens=5, reasoning_tokens=2, total_tokens=15
    )
    assert event.error == TurnError(message="boom")
    assert event.occurred_at == RECEIVED


def test_generic_takes_top_level_fields() -> None:
    """The generic normaliser reads canonical top-level session_id and turn_id."""
    event = normalise_generic(
        "gen",
        {"id": "e", "type": "agent.chat.turn.started", "session_id": "s", "turn_id": "t"},
        RECEIVED,
    )
    assert (event.source, event.session_id, event.turn_id) == ("gen", "s", "t")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "t"}, "id"),
        ({"id": "", "type": "t"}, "id"),
        ({"id": 7, "type": "t"}, "id"),
        ({"id": "e"}, "type"),
        ({"id": "e", "type": "t", "occurred_at": "soon"}, "occurred_at"),
        ({"id": "e", "type": "t", "occurred_at": "2026-11-20T09:00:00"}, "occurred_at"),
        ({"id": "e", "type": "t", "data": []}, "data"),
        ({"id": "e", "type": "t", "data": {"usage": {"inputTokens": -1}}}, "usage.inputTokens"),
        ({"id": "e", "type": "t", "data": {"retryAfter": "5s"}}, "retryAfter"),
        ({"id": "e", "type": "t", "data": {"error": 42}}, "error"),
        ({"id": "x" * 300, "type": "t"}, "id"),
    ],
)
def test_invalid_events_name_the_field(body: dict[str, Any], field: str) -> None:
    """Each invalid field raises InvalidEvent naming that field."""
    with pytest.raises(InvalidEvent) as raised:
        casedev(body)
    assert raised.value.field == field
