"""`relay send --demo`: a realistic lifecycle that a new user can watch move."""

from __future__ import annotations

from relay.config import SourceSettings
from relay.send import demo_lifecycle, send_events
from tests.conftest import SECRET, Relay


async def test_demo_drives_sessions_through_conflict_and_failure(relay: Relay) -> None:
    """Three demo sessions all get ready, finish their turns, and show a conflict and a failure."""
    source = SourceSettings(id="casedev", provider="casedev", secrets=[SECRET])
    events = demo_lifecycle(3, seed=7)
    answers = await send_events(str(relay.client.make_url("")), source, events)
    assert [status for status, _ in answers] == [202] * len(events)

    resp = await relay.client.get("/v1/sessions", headers=relay.auth)
    sessions = (await resp.json())["items"]
    assert len(sessions) == 3
    assert {s["readiness"] for s in sessions} == {"ready"}
    assert {s["turn_status"] for s in sessions} == {"idle"}
    assert all(s["counts"]["completed"] >= 1 for s in sessions)
    assert sum(s["counts"]["conflicts"] for s in sessions) >= 1
    assert sum(s["counts"]["failed"] for s in sessions) >= 1
    assert all(s["usage"]["cost_micros"] > 0 for s in sessions)


def test_demo_events_are_in_occurrence_order_with_unique_ids() -> None:
    """Demo events are sorted by occurrence time and never repeat an id."""
    events = demo_lifecycle(6, seed=3)
    times = [event["occurred_at"] for event in events]
    assert times == sorted(times)
    assert len({event["id"] for event in events}) == len(events)


def test_every_demo_session_has_a_completed_turn_whatever_the_seed() -> None:
    """Random failures never take every turn of a session: its first turn always completes."""
    for seed in range(300):
        completed = {
            event["data"]["chatId"]
            for event in demo_lifecycle(3, seed=seed)
            if event["type"] == "agent.chat.turn.completed"
        }
        chats = {event["data"]["chatId"] for event in demo_lifecycle(3, seed=seed)}
        assert len(completed) == 3, seed
        assert len(chats) == 3
