"""Derived state through the real write path, and the read API that serves it."""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import orjson
import pytest

from relay.appkeys import HUB, STORE
from tests.conftest import FIXTURES, LIFECYCLE_CHANGES, Relay, RelayFactory, fixture_events
from tests.receivers import eventually
from tests.test_ingest import signed

EXPECTED = json.loads((FIXTURES / "session_lifecycle.expected.json").read_text())
SESSION = EXPECTED["session_id"]


async def ingest(relay: Relay, event: dict[str, Any]) -> int:
    body = orjson.dumps(event)
    resp = await relay.client.post("/v1/ingest/casedev", data=body, headers=signed(body))
    assert resp.status in (200, 202)
    return resp.status


async def get(relay: Relay, path: str, **params: Any) -> Any:
    resp = await relay.client.get(path, params=params, headers=relay.auth)
    assert resp.status == 200, await resp.text()
    return await resp.json()


def summary(session: dict[str, Any], turns: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("session_id", "readiness", "runtime_reused", "scope_activated", "worker_ready")
    return {
        **{key: session[key] for key in keys},
        "time_to_ready_ms": session["time_to_ready_ms"],
        "turn_status": session["turn_status"],
        "active_turn_id": session["active_turn_id"],
        "counts": session["counts"],
        "usage": {key: session["usage"][key] for key in EXPECTED["usage"]},
        "turns": {turn["turn_id"]: turn["status"] for turn in turns},
    }


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled 1", "shuffled 2", "dupes"])
async def test_fixture_in_any_order_gives_expected_state(relay: Relay, order: str) -> None:
    """Ingested over HTTP in any order, with duplicates, the fixture gives the expected state."""
    events = fixture_events()
    rng = random.Random(order)
    if order == "reversed":
        events.reverse()
    elif order.startswith("shuffled"):
        rng.shuffle(events)
    elif order == "dupes":
        events = events + rng.sample(events, 5)
        rng.shuffle(events)
    for event in events:
        await ingest(relay, event)
    session = await get(relay, f"/v1/sessions/{SESSION}")
    turns = (await get(relay, f"/v1/sessions/{SESSION}/turns"))["items"]
    assert summary(session, turns) == EXPECTED
    assert await relay.client.app[STORE].check_derived_state() == []


async def test_changes_follow_the_lifecycle(relay: Relay) -> None:
    """In order, the fixture produces the expected change log with full snapshots."""
    for event in fixture_events():
        await ingest(relay, event)
    changes = (await get(relay, "/v1/changes"))["items"]
    assert [c["type"] for c in changes] == LIFECYCLE_CHANGES
    assert [c["id"] for c in changes] == sorted(c["id"] for c in changes)
    completed = changes[LIFECYCLE_CHANGES.index("turn.completed")]
    assert completed["turn"]["usage"]["input_tokens"] == 5120
    assert completed["session"]["counts"]["completed"] == 1
    assert completed["cause"] == {
        "event_id": "evt_01JD7Q0006",
        "source": "casedev",
        "type": "agent.chat.turn.completed",
    }
    first_turn = changes[LIFECYCLE_CHANGES.index("turn.started")]["id"]
    turns_only = (await get(relay, "/v1/changes", type="turn.*", after=first_turn))["items"]
    assert [c["type"] for c in turns_only] == [
        "turn.completed",
        "turn.started",
        "turn.conflict",
        "turn.failed",
    ]


async def test_duplicates_and_unknown_types_record_no_change(relay: Relay) -> None:
    """A duplicate or an event of an unknown type adds no change; the unknown is stored."""
    events = fixture_events()
    await ingest(relay, events[0])
    before = (await get(relay, "/v1/changes"))["items"]
    assert await ingest(relay, events[0]) == 200
    unknown = {**events[1], "id": "evt_unknown", "type": "agent.sandbox.hibernated"}
    await ingest(relay, unknown)
    assert (await get(relay, "/v1/changes"))["items"] == before
    stored = (await get(relay, f"/v1/sessions/{SESSION}/events"))["items"]
    assert [e["type"] for e in stored] == ["agent.chat.session.created", "agent.sandbox.hibernated"]


async def test_unknown_ids_are_404(relay: Relay) -> None:
    """Unknown sessions are 404 NOT_FOUND on every session endpoint."""
    for path in ("/v1/sessions/nope", "/v1/sessions/nope/turns", "/v1/sessions/nope/events"):
        resp = await relay.client.get(path, headers=relay.auth)
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "NOT_FOUND"


async def test_bad_query_parameters_are_400(relay: Relay) -> None:
    """Bad filters, cursors and long-poll parameters get 400 INVALID_PARAMETER."""
    await ingest(relay, fixture_events()[0])
    cases = [
        ("/v1/sessions", {"readiness": "maybe"}),
        ("/v1/sessions", {"cursor": "!!!"}),
        ("/v1/sessions", {"cursor": "WzFd"}),
        (f"/v1/sessions/{SESSION}", {"wait": "perhaps"}),
        (f"/v1/sessions/{SESSION}", {"wait": "true", "timeout": "61"}),
        (f"/v1/sessions/{SESSION}/turns", {"cursor": "WyJ4Il0"}),
        ("/v1/changes", {"after": "-3"}),
    ]
    for path, params in cases:
        resp = await relay.client.get(path, params=params, headers=relay.auth)
        assert resp.status == 400, (path, params)
        assert (await resp.json())["error"]["code"] == "INVALID_PARAMETER"


async def test_empty_query_parameters_mean_absent(relay: Relay) -> None:
    """`?readiness=&turn_status=&limit=&cursor=` (an empty form field) means "any": the
    same answer as without them, not a 400."""
    for event in fixture_events():
        await ingest(relay, event)
    empty = {"readiness": "", "turn_status": "", "limit": "", "cursor": ""}
    assert await get(relay, "/v1/sessions", **empty) == await get(relay, "/v1/sessions")
    assert (await get(relay, "/v1/sessions", **empty))["items"][0]["session_id"] == SESSION
    changes = await get(relay, "/v1/changes", after="", limit="", type="")
    assert changes == await get(relay, "/v1/changes")
    either = await relay.client.get(
        "/v1/sessions?readiness=&readiness=provisioning", headers=relay.auth
    )
    assert (await either.json())["items"] == []  # the non-empty value applies
    assert len(changes["items"]) == len(LIFECYCLE_CHANGES)


def lifecycle(session: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"evt_{session}_{n}",
            "type": "agent.chat.session.created",
            "occurred_at": "2026-11-20T09:00:00.000Z",
            "data": {"chatId": session},
        }
    ]


async def test_session_pages_skip_and_repeat_nothing_while_data_changes(relay: Relay) -> None:
    """Paging newest-first while sessions are updated and created sees each once."""
    for n in range(12):
        await ingest(relay, lifecycle(f"chat_{n:02d}", n)[0])
    seen: list[str] = []
    page = await get(relay, "/v1/sessions", limit=5)
    seen += [s["session_id"] for s in page["items"]]
    assert seen[0] == "chat_11"
    # Activity during paging: an old session moves to the front, a new one appears.
    ready = {**fixture_events()[3], "id": "evt_move", "data": {"chatId": "chat_01"}}
    await ingest(relay, ready)
    await ingest(relay, lifecycle("chat_new", 99)[0])
    while page["next_cursor"]:
        page = await get(relay, "/v1/sessions", limit=5, cursor=page["next_cursor"])
        seen += [s["session_id"] for s in page["items"]]
    assert sorted(seen) == [f"chat_{n:02d}" for n in range(12)]
    fresh = await get(relay, "/v1/sessions", limit=2)
    assert [s["session_id"] for s in fresh["items"]] == ["chat_new", "chat_01"]
    ready_only = await get(relay, "/v1/sessions", readiness="ready")
    assert [s["session_id"] for s in ready_only["items"]] == ["chat_01"]


async def test_long_poll_returns_soon_after_a_change(relay: Relay) -> None:
    """A waiting request answers soon after an ingest that changes the session, long
    before its timeout (the latency itself is measured by `make bench-longpoll`)."""
    events = fixture_events()
    await ingest(relay, events[0])
    version = (await get(relay, f"/v1/sessions/{SESSION}"))["version"]

    async def wait() -> tuple[float, dict[str, Any]]:
        params = {"wait": "true", "version": version, "timeout": 10}
        resp = await relay.client.get(f"/v1/sessions/{SESSION}", params=params, headers=relay.auth)
        return time.monotonic(), await resp.json()

    waiting = asyncio.create_task(wait())
    hub = relay.client.app[HUB]
    await eventually(lambda: hub.watching == 1)  # the request is waiting for a change
    assert not waiting.done()
    sent = time.monotonic()
    await ingest(relay, events[3])
    answered, session = await waiting
    assert answered - sent < 5  # the timeout is 10 s
    assert session["version"] > version
    assert session["readiness"] == "ready"


async def test_long_poll_times_out_with_the_unchanged_state(relay: Relay) -> None:
    """With no change, the long-poll answers the current state after `timeout`."""
    await ingest(relay, fixture_events()[0])
    version = (await get(relay, f"/v1/sessions/{SESSION}"))["version"]
    started = time.monotonic()
    session = await get(relay, f"/v1/sessions/{SESSION}", wait="true", version=version, timeout=1)
    assert 0.9 < time.monotonic() - started < 10  # answered at its timeout, not the 30 s default
    assert session["version"] == version


async def test_state_check_notices_a_tampered_snapshot(start_relay: RelayFactory) -> None:
    """The replay check fails when a stored snapshot does not match the events."""
    relay = await start_relay()
    for event in fixture_events():
        await ingest(relay, event)
    store = relay.client.app[STORE]
    assert await store.check_derived_state() == []
    await store._write(  # type: ignore[attr-defined]
        "UPDATE sessions SET snapshot = ? WHERE session_id = ?", (b"{}", SESSION)
    )
    assert await store.check_derived_state() == [
        f"session {SESSION}: stored state differs from a rebuild"
    ]


async def test_state_check_replays_history_under_the_rule_it_was_written_with(
    start_relay: RelayFactory,
) -> None:
    """A store from before provisioning steps were logged (its change log has no
    `session.provisioning` for a session not yet ready, and migration 0006 marks where the
    new rule starts) checks clean; a step missing after that mark is still reported."""
    relay = await start_relay()
    store = relay.client.app[STORE]
    write = store._write  # type: ignore[attr-defined]
    for event in fixture_events():
        await ingest(relay, event)
    # What a relay before migration 0006 had written, and what the migration then recorded.
    await write("DELETE FROM changes WHERE type = 'session.provisioning'", ())
    await write(
        "UPDATE store_facts SET value = (SELECT max(seq) + 1 FROM events)"
        " WHERE name = 'provisioning_steps_from_seq'",
        (),
    )
    later = [
        {**event, "id": f"{event['id']}_b", "data": {**event["data"], "chatId": "chat_b"}}
        for event in fixture_events()
    ]
    for event in later:
        await ingest(relay, event)
    assert await store.check_derived_state() == []
    steps = await get(relay, "/v1/changes", type="session.provisioning")
    assert [c["session_id"] for c in steps["items"]] == ["chat_b", "chat_b"]
    await write("DELETE FROM changes WHERE id = ?", (steps["items"][0]["id"],))
    problems = await store.check_derived_state()
    assert len(problems) == 1, problems
    assert "session.provisioning" in problems[0]
